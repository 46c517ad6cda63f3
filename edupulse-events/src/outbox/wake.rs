//! Waking an idle relay after an emitting transaction ends, from outside it.
//!
//! A `pg_notify` inside a transaction makes its commit take Postgres' notify lock, a
//! lock of the whole cluster that it holds until the commit is flushed: concurrent
//! notifying writers commit one at a time, each waiting for its own WAL flush, where
//! they would otherwise share one (BENCHMARKS.md, "The notify lock"). So while the relay
//! says it is idle, one writer at a time notifies in its transaction: the one holding
//! the notifier's advisory lock ([`HOLD_CLASS`], 0) until its transaction ends; alone,
//! a writer wakes the relay at no cost. The others ask this waker, which notifies on a connection of its own, in
//! a transaction that does not wait for its flush (`synchronous_commit` off: a lost
//! notification costs a poll interval, never an event), and only while the relay says
//! it is idle:
//!
//! - [`Emitter::emit`] and [`Emitter::emit_all`] commit their own transaction and ask
//!   after the commit ([`Waker::wake`]).
//! - [`Emitter::emit_in`] writes in the caller's transaction, whose end the library
//!   cannot see. While the relay is idle, its statement takes a shared advisory lock of
//!   that transaction ([`HOLD_CLASS`], a key drawn from the event's id), which Postgres
//!   releases when the transaction commits or rolls back, after its rows are visible.
//!   The waker waits for that lock ([`Waker::wake_at_end`]) and then notifies: the
//!   wake-up comes at the end of the transaction, as a notification in it would, and
//!   a rollback wakes the relay to no harm. A transaction held open does not hold up
//!   the others' wake-ups: the waker waits at most [`LOCK_WAIT`] at a time, then
//!   notifies for the transactions that have ended and waits again for the rest.
//!
//! Looking at the idle flag after the end is as safe as looking before it: a writer
//! that sees the relay busy has committed already, and a relay going idle looks for
//! new events once more after it says so. Asks that come in while a wake-up is being
//! sent are sent as one more.
//!
//! [`Emitter::emit`]: super::Emitter::emit
//! [`Emitter::emit_all`]: super::Emitter::emit_all
//! [`Emitter::emit_in`]: super::Emitter::emit_in

use crate::support::pg::is_lock_timeout;
use crate::support::retry::AbortOnDrop;
use crate::support::sql::{CHANNEL, RELAY_IDLE, SCHEMA};
use const_format::formatcp;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;

/// The first key of the advisory locks an emitting transaction holds until it ends
/// (the two-key form, whose keys never meet the one-key form's): "EDPU" in ASCII. An
/// application that takes two-key advisory locks of this class shares their keys.
pub(crate) const HOLD_CLASS: i32 = 0x4544_5055;

/// How long the waker waits for one emitting transaction to end before it looks at
/// the others.
pub(crate) const LOCK_WAIT: Duration = Duration::from_millis(100);

/// Notifies the relay if it says it is idle, without waiting for the flush of this
/// transaction's commit (`set_config(..., true)` holds for the statement's own
/// transaction, whose commit reads it).
const WAKE: &str = formatcp!(
    "SELECT pg_catalog.set_config('synchronous_commit', 'off', true),
            pg_catalog.pg_notify('{CHANNEL}', '')
     FROM {RELAY_IDLE} WHERE last_value = 1"
);

/// Of the keys `$2`, those whose transaction still holds its lock (still open).
const STILL_OPEN: &str = formatcp!(
    "SELECT u.k FROM unnest($2::int4[]) AS u(k)
     WHERE NOT pg_catalog.pg_try_advisory_xact_lock($1, u.k)"
);

/// Waits, in one transaction of its own, for every transaction holding one of the
/// keys `$1` to end (each wait bounded by `$2` ms: Postgres then fails it with
/// `lock_not_available`), then does what [`WAKE`] does (migration 10).
const WAIT_THEN_WAKE: &str = formatcp!("SELECT {SCHEMA}.wake_after($1, $2)");

/// Sends the wake-ups the emitter asks for, one at a time, from a task of its own
/// (started at the first).
pub(crate) struct Waker {
    pool: PgPool,
    asked: Arc<Asked>,
    task: OnceLock<AbortOnDrop<()>>,
}

#[derive(Debug, Default)]
struct Asked {
    /// A wake-up after a commit that has happened.
    pending: AtomicBool,
    /// Keys of transactions to wait for, then wake.
    held: Mutex<Vec<i32>>,
    notify: Notify,
}

impl Waker {
    pub fn new(pool: PgPool) -> Waker {
        Waker {
            pool,
            asked: Arc::default(),
            task: OnceLock::new(),
        }
    }

    /// Asks for a wake-up: sent soon, once for every ask since the last one sent.
    /// Call it from within a tokio runtime (every emit is).
    pub fn wake(&self) {
        self.asked.pending.store(true, Ordering::SeqCst);
        self.ask();
    }

    /// Asks for a wake-up once the transaction holding the advisory lock
    /// ([`HOLD_CLASS`], `key`) ends.
    pub fn wake_at_end(&self, key: i32) {
        match self.asked.held.lock() {
            Ok(mut held) => held.push(key),
            Err(poisoned) => poisoned.into_inner().push(key),
        }
        self.ask();
    }

    fn ask(&self) {
        self.asked.notify.notify_one();
        self.task
            .get_or_init(|| AbortOnDrop(tokio::spawn(send(self.pool.clone(), self.asked.clone()))));
    }
}

impl Asked {
    fn take_held(&self) -> Vec<i32> {
        match self.held.lock() {
            Ok(mut held) => std::mem::take(&mut *held),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

/// Sends a wake-up for each round of asks, until the waker is dropped.
async fn send(pool: PgPool, asked: Arc<Asked>) {
    // Keys whose transactions were still open at the last look.
    let mut open: Vec<i32> = Vec::new();
    let mut warned = false;
    loop {
        if open.is_empty() {
            asked.notify.notified().await;
        }
        while asked.pending.swap(false, Ordering::SeqCst) {
            wake(&pool).await;
        }
        open.extend(asked.take_held());
        if open.is_empty() {
            continue;
        }
        let waited = sqlx::query(WAIT_THEN_WAKE)
            .bind(&open)
            .bind(i32::try_from(LOCK_WAIT.as_millis()).unwrap_or(i32::MAX))
            .execute(&pool)
            .await;
        match waited {
            Ok(_) => open.clear(),
            Err(error) if is_lock_timeout(&error) => {
                // One is still open after `LOCK_WAIT`: wake for those that ended.
                match sqlx::query_scalar::<_, i32>(STILL_OPEN)
                    .bind(HOLD_CLASS)
                    .bind(&open)
                    .fetch_all(&pool)
                    .await
                {
                    Ok(still) => {
                        if still.len() < open.len() {
                            wake(&pool).await;
                        }
                        open = still;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot wake the relay; it polls");
                        open.clear();
                    }
                }
            }
            Err(error) => {
                // The relay's poll interval finds the events instead. Said once at
                // `warn`: a role without `EXECUTE` on the function never gets a wake-up
                // this way.
                if warned {
                    tracing::debug!(%error, "cannot wake the relay; it polls");
                } else {
                    warned = true;
                    tracing::warn!(
                        %error,
                        "cannot wait for an emitting transaction to wake the relay; it \
                         finds the events at its poll interval (the emitting role needs \
                         EXECUTE on edupulse.wake_after: see grants_sql)"
                    );
                }
                open.clear();
            }
        }
    }
}

async fn wake(pool: &PgPool) {
    if let Err(error) = sqlx::query(WAKE).execute(pool).await {
        // The relay's poll interval finds the events instead.
        tracing::debug!(%error, "cannot wake the relay; it polls");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wake_up_is_sent_only_while_the_relay_is_idle_and_without_a_flush_wait() {
        assert!(WAKE.contains("FROM edupulse.relay_idle WHERE last_value = 1"));
        assert!(WAKE.contains("set_config('synchronous_commit', 'off', true)"));
        assert!(WAKE.contains("pg_notify('edupulse_outbox', '')"));
        assert_eq!(WAIT_THEN_WAKE, "SELECT edupulse.wake_after($1, $2)");
        // The function waits for the class the emitting statements lock.
        let migration = include_str!("../../../migrations/20261202000010_wake_after.sql");
        assert!(migration.contains(&format!("pg_advisory_xact_lock({HOLD_CLASS}, k)")));
        assert!(migration.contains("pg_notify('edupulse_outbox', '')"));
        assert!(
            migration.find("relay_idle") > migration.find("pg_advisory_xact_lock"),
            "the flag is read after the waits"
        );
    }
}
