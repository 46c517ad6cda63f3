//! Waking an idle relay after the library's own transactions commit ([`Emitter::emit`]
//! and [`Emitter::emit_all`]), from outside them.
//!
//! A `pg_notify` inside a transaction makes its commit take Postgres' notify lock, a
//! lock of the whole cluster that it holds until the commit is flushed: concurrent
//! notifying writers commit one at a time, each waiting for its own WAL flush, where
//! they would otherwise share one (BENCHMARKS.md, "The notify lock"). So after the
//! library commits a transaction of its own, it asks this waker instead, which
//! notifies on a connection of its own, in a transaction that does not wait for its
//! flush (`synchronous_commit` off: a lost notification costs a poll interval, never
//! an event), and only while the relay says it is idle. Wake-ups asked for while one
//! is being sent are sent as one more.
//!
//! Looking at the idle flag after the commit is as safe as looking before it: a
//! writer that sees the relay busy has committed already, and a relay going idle
//! looks for new events once more after it says so.
//!
//! [`Emitter::emit`]: super::Emitter::emit
//! [`Emitter::emit_all`]: super::Emitter::emit_all

use crate::support::retry::AbortOnDrop;
use crate::support::sql::{CHANNEL, RELAY_IDLE};
use const_format::formatcp;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;

/// Notifies the relay if it says it is idle, without waiting for the flush of this
/// transaction's commit (`set_config(..., true)` holds for the statement's own
/// transaction, whose commit reads it).
const WAKE: &str = formatcp!(
    "SELECT pg_catalog.set_config('synchronous_commit', 'off', true),
            pg_catalog.pg_notify('{CHANNEL}', '')
     FROM {RELAY_IDLE} WHERE last_value = 1"
);

/// Sends the wake-ups the emitter asks for, one at a time, from a task of its own
/// (started at the first).
pub(crate) struct Waker {
    pool: PgPool,
    asked: Arc<Asked>,
    task: OnceLock<AbortOnDrop<()>>,
}

#[derive(Debug, Default)]
struct Asked {
    pending: AtomicBool,
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
        self.asked.notify.notify_one();
        self.task
            .get_or_init(|| AbortOnDrop(tokio::spawn(send(self.pool.clone(), self.asked.clone()))));
    }
}

/// Sends a wake-up for each round of asks, until the waker is dropped.
async fn send(pool: PgPool, asked: Arc<Asked>) {
    loop {
        asked.notify.notified().await;
        while asked.pending.swap(false, Ordering::SeqCst) {
            if let Err(error) = sqlx::query(WAKE).execute(&pool).await {
                // The relay's poll interval finds the events instead.
                tracing::debug!(%error, "cannot wake the relay; it polls");
            }
        }
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
    }
}
