//! Waking the leader: the idle flag that tells writers whether to notify at commit,
//! and the LISTEN connection that turns their notifications into a wake-up.

use crate::support::pg::Within;
use crate::support::retry::AbortOnDrop;
use crate::support::sql::{CHANNEL, RELAY_IDLE};
use const_format::formatcp;
use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// A batch at least this large means writers outpace the relay: it tells them it is
/// busy (they stop notifying) until it finds nothing to publish. Smaller batches keep
/// it idle, so that light traffic costs no flag updates and is woken at once.
pub(super) const BUSY_BATCH: usize = 8;

/// Sets the flag; a sequence, so the write is immediate (not transactional).
const SET_IDLE: &str = formatcp!("SELECT pg_catalog.setval('{RELAY_IDLE}', $1)");

/// The leader's side of waking: the flag as it last set it, and the wake-ups.
pub(super) struct Wake {
    notified: Arc<Notify>,
    idle: bool,
    /// How long setting the flag may take (`statement_timeout`).
    limit: Duration,
    _listener: AbortOnDrop<()>,
}

impl Wake {
    /// Starts listening; the flag is taken to say busy until [`Wake::set_idle`].
    pub fn listen(pool: sqlx::PgPool, limit: Duration) -> Wake {
        let notified = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(pool, notified.clone()));
        Wake {
            notified,
            idle: false,
            limit,
            _listener: AbortOnDrop(listener),
        }
    }

    /// Whether the leader last said it is idle (writers notify).
    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// Tells writers whether to notify at commit.
    pub async fn set_idle(
        &mut self,
        conn: &mut PgConnection,
        idle: bool,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(SET_IDLE)
            .bind(i64::from(idle))
            .execute(&mut *conn)
            .within(self.limit)
            .await?;
        self.idle = idle;
        Ok(())
    }

    /// Says busy if a batch of `size` shows writers outpacing the relay: their
    /// notifications are of no use now, and each costs them a turn on Postgres'
    /// commit-time notify lock.
    pub async fn busy_if_outpaced(
        &mut self,
        conn: &mut PgConnection,
        size: usize,
    ) -> Result<(), sqlx::Error> {
        if self.idle && size >= BUSY_BATCH {
            self.set_idle(conn, false).await?;
        }
        Ok(())
    }

    /// Waits for a notification (or a reconnect of the listener).
    pub async fn notified(&self) {
        self.notified.notified().await;
    }
}

/// Wakes the leader on every notification, and after a reconnect (notifications sent
/// meanwhile are lost; the poll interval covers the rest).
async fn listen(pool: sqlx::PgPool, wake: Arc<Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "relay listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::debug!(%error, "relay cannot LISTEN; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => wake.notify_one(),
                // The connection dropped and was re-established: look again.
                Ok(None) => wake.notify_one(),
                Err(error) => {
                    tracing::debug!(%error, "relay listener failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}
