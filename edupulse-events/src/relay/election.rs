//! Who leads: the relay that holds a Postgres advisory lock on its own connection.
//! Standbys try the lock every `standby_interval`; a leader that fails to publish for
//! `yield_after` lets go for a while, so that a replica that can reach NATS takes over.

use super::leader::{lead, Led};
use super::RelayState;
use crate::service::nats::Mover;
use crate::service::Inner;
use crate::support::pg::{is_undefined_table, open_session, Within};
use crate::support::retry::sleep_or_stop;
use sqlx::{Connection, PgConnection};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The Postgres advisory lock (a session-level `pg_advisory_lock` of one `bigint` key)
/// that the leading relay holds while it leads: "edupulse" in ASCII. Monitoring finds the
/// leader's session with it in `pg_locks` (`locktype = 'advisory'`, `classid` the high
/// and `objid` the low 32 bits), as `edupulse status` does.
pub const RELAY_LEADER_LOCK: i64 = 0x6564_7570_756c_7365;

/// The key the leader locks.
const LEADER_LOCK: i64 = RELAY_LEADER_LOCK;

const TRY_LOCK: &str = "SELECT pg_catalog.pg_try_advisory_lock($1)";
const UNLOCK: &str = "SELECT pg_catalog.pg_advisory_unlock($1)";

/// What a round of the election decided.
enum Round {
    /// Stop the relay.
    Stop,
    /// Wait this long, then try again.
    Wait(Duration),
}

/// The relay task: tries to lead until told to stop.
pub(super) async fn run(inner: Arc<Inner>, stop: watch::Receiver<bool>, state: Arc<RelayState>) {
    let mut election = Election {
        inner,
        stop,
        state,
        standby: None,
        mover: Mover::default(),
    };
    loop {
        if *election.stop.borrow() {
            break;
        }
        match election.round().await {
            Round::Stop => break,
            Round::Wait(pause) => {
                if sleep_or_stop(&mut election.stop, pause).await {
                    break;
                }
            }
        }
    }
    if let Some(conn) = election.standby.take() {
        let limit = election.inner.config.relay.statement_timeout;
        let _ = conn.close().within(limit).await;
    }
}

/// A relay between rounds: its standby connection, kept to try the lock again.
struct Election {
    inner: Arc<Inner>,
    stop: watch::Receiver<bool>,
    state: Arc<RelayState>,
    standby: Option<PgConnection>,
    /// Moves the NATS client off a server that cannot reach JetStream, across terms.
    mover: Mover,
}

impl Election {
    /// Tries the lock once, and leads while it holds it.
    async fn round(&mut self) -> Round {
        let settings = &self.inner.config.relay;
        let mut conn = match self.standby.take() {
            Some(conn) => conn,
            None => match open_session(&self.inner.pg_options, settings.statement_timeout).await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "relay cannot reach Postgres; retrying");
                    self.state
                        .failing(format!("cannot reach Postgres: {error}; retrying"));
                    return Round::Wait(settings.standby_interval);
                }
            },
        };
        let locked = sqlx::query_scalar::<_, bool>(TRY_LOCK)
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .within(settings.statement_timeout)
            .await;
        match locked {
            Ok(true) => self.lead(conn).await,
            Ok(false) => {
                self.state.recovered();
                self.standby = Some(conn);
                Round::Wait(settings.standby_interval)
            }
            Err(error) => {
                tracing::warn!(%error, "relay cannot try the leader lock; retrying");
                self.state
                    .failing(format!("cannot try the leader lock: {error}; retrying"));
                Round::Wait(settings.standby_interval)
            }
        }
    }

    /// Leads on `conn`, which holds the lock, and decides what follows.
    async fn lead(&mut self, mut conn: PgConnection) -> Round {
        let settings = &self.inner.config.relay;
        self.state.leader.store(true, Ordering::SeqCst);
        let leading =
            crate::telemetry::Leading::start(self.inner.pool.clone(), settings.statement_timeout);
        tracing::info!("relay leads");
        let outcome = lead(
            &self.inner,
            &mut conn,
            &mut self.stop,
            &self.state,
            &mut self.mover,
        )
        .await;
        drop(leading);
        self.state.leader.store(false, Ordering::SeqCst);
        match outcome {
            Ok(Led::Stopped) => {
                let _ = sqlx::query(UNLOCK)
                    .bind(LEADER_LOCK)
                    .execute(&mut conn)
                    .within(settings.statement_timeout)
                    .await;
                let _ = conn.close().within(settings.statement_timeout).await;
                tracing::info!("relay stopped");
                Round::Stop
            }
            Ok(Led::Yielded) => {
                let unlocked = sqlx::query(UNLOCK)
                    .bind(LEADER_LOCK)
                    .execute(&mut conn)
                    .within(settings.statement_timeout)
                    .await;
                if unlocked.is_ok() {
                    self.standby = Some(conn);
                }
                // Long enough for a standby (trying every standby_interval) to take the
                // lead; if none does, this relay leads again.
                Round::Wait((settings.standby_interval * 3).max(settings.retry_max))
            }
            #[cfg(feature = "test-hooks")]
            Ok(Led::Crashed) => {
                // Dropping the connection without a word is what a dead process does.
                drop(conn);
                tracing::warn!("relay simulated a crash before marking");
                Round::Stop
            }
            Err(error) if is_undefined_table(&error) => {
                tracing::error!(
                    %error,
                    "the outbox tables are missing: call EventService::migrate() \
                     (or apply the migrations) before the relay can publish"
                );
                self.state.failing(
                    "the outbox tables are missing: call EventService::migrate() before the relay can publish",
                );
                let _ = conn.close().within(settings.statement_timeout).await;
                Round::Wait(settings.retry_max)
            }
            Err(error) => {
                tracing::warn!(%error, "relay lost its leader connection; standing by");
                self.state
                    .failing(format!("lost its leader connection to Postgres: {error}"));
                drop(conn);
                Round::Wait(settings.retry_base)
            }
        }
    }
}
