//! The fence: what keeps the relay from publishing an event ahead of an earlier one.
//!
//! Sequence numbers are drawn when a row is inserted but become visible only at commit,
//! so a later event can commit before an earlier one. Before each batch the leader reads
//! the highest sequence drawn so far (the fence) and waits until every transaction that
//! was writing the outbox at that moment has ended (it watches their locks in
//! `pg_locks`). Every event up to the fence is then committed or gone, and the batch
//! stops at the fence. A transaction that holds its events longer than
//! `order_wait_limit` is given up on: later events go out ahead of it, and the relay is
//! *held* (it marks events one by one) until that transaction has ended.

use crate::relay::RelaySettings;
use crate::support::pg::Within;
use crate::support::retry::sleep_or_stop;
use crate::support::sql::{OUTBOX, OUTBOX_SEQ};
use const_format::formatcp;
use sqlx::PgConnection;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The transactions writing the outbox now (but this session and the marker's, `$1`).
pub(super) const HOLDERS: &str = formatcp!(
    "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{{}}')
         FROM pg_catalog.pg_locks
         WHERE locktype = 'relation'
           AND database = (SELECT oid FROM pg_catalog.pg_database
                           WHERE datname = pg_catalog.current_database())
           AND relation = '{OUTBOX}'::regclass
           AND mode = 'RowExclusiveLock'
           AND pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
           AND pid IS DISTINCT FROM $1"
);

/// The fence and the writers at that moment, in one round trip. The order matters: a
/// writer takes its lock before it draws a sequence number, so every writer holding a
/// number up to the fence is among the holders only if they are read after the fence.
/// The subquery refers to the fence's row, so Postgres runs it after reading it.
pub(super) const FENCE_AND_HOLDERS: &str = formatcp!(
    "SELECT s.last_value, ({HOLDERS} AND s.last_value IS NOT NULL) FROM {OUTBOX_SEQ} AS s"
);

/// How many of the transactions `$1` still hold the outbox's lock, counting any
/// prepared transaction (a writer waited for may PREPARE meanwhile, which gives it
/// another virtual id and no backend) but those given up on (`$2`): an orphaned
/// prepared transaction must not make every later wait last `order_wait_limit`.
const STILL_HOLDING: &str = formatcp!(
    "SELECT count(*)
FROM pg_catalog.pg_locks
WHERE locktype = 'relation'
  AND database = (SELECT oid FROM pg_catalog.pg_database
                  WHERE datname = pg_catalog.current_database())
  AND relation = '{OUTBOX}'::regclass
  AND (virtualtransaction = ANY($1)
       OR (pid IS NULL AND NOT virtualtransaction = ANY($2)))"
);

/// The virtual ids of the transactions prepared longer than `$1` µs ago: orphaned, or
/// as good as, and given up on at once rather than waited for.
const PREPARED_LONG_AGO: &str = "\
SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{}')
FROM pg_catalog.pg_prepared_xacts AS p
JOIN pg_catalog.pg_locks AS l
  ON l.locktype = 'transactionid' AND l.transactionid = p.transaction
WHERE p.prepared < pg_catalog.now() - $1 * interval '1 microsecond'";

/// A transaction's virtual id, as `pg_locks.virtualtransaction` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub(super) struct Vxid(String);

/// The leader's view of the writers: those it gave up waiting for, and whether it is
/// held by them.
#[derive(Debug, Default)]
pub(super) struct Fence {
    /// Transactions that held earlier events past `order_wait_limit` and had not ended
    /// when last seen.
    given_up: HashSet<Vxid>,
    /// Whether the relay has published past a transaction it gave up on, which may
    /// still commit events below what it has read since. While held, events are marked
    /// one by one and the mark (`published_through`) stays: moving it past such events
    /// would count them as published.
    held: bool,
}

impl Fence {
    /// Whether events read now must be marked one by one.
    pub fn held(&self) -> bool {
        self.held
    }

    /// Whether the transactions given up on have all ended while held: read once more
    /// from the mark, which finds what they committed below the events read since.
    pub fn reread_due(&self) -> bool {
        self.held && self.given_up.is_empty()
    }

    /// After a read that started at the mark because [`Fence::reread_due`] said so:
    /// the relay is no longer held unless it gave up on someone again meanwhile.
    pub fn reread_done(&mut self) {
        if self.given_up.is_empty() {
            self.held = false;
        }
    }

    /// Reads the fence and waits for the writers holding numbers up to it; `None` if
    /// told to stop meanwhile. `marker_pid` is the marking connection's backend, whose
    /// transaction the fence does not wait for.
    pub async fn pass(
        &mut self,
        conn: &mut PgConnection,
        settings: &RelaySettings,
        stop: &mut watch::Receiver<bool>,
        marker_pid: i32,
    ) -> Result<Option<i64>, sqlx::Error> {
        let (fence, holders): (i64, Vec<Vxid>) = sqlx::query_as(FENCE_AND_HOLDERS)
            .bind(marker_pid)
            .fetch_one(&mut *conn)
            .within(settings.statement_timeout)
            .await?;
        if self.wait_for(conn, settings, stop, holders).await? {
            return Ok(None);
        }
        Ok(Some(fence))
    }

    /// Waits for every transaction writing the outbox now; true if told to stop.
    pub async fn wait_for_writers(
        &mut self,
        conn: &mut PgConnection,
        settings: &RelaySettings,
        stop: &mut watch::Receiver<bool>,
        marker_pid: i32,
    ) -> Result<bool, sqlx::Error> {
        let holders = sqlx::query_scalar(HOLDERS)
            .bind(marker_pid)
            .fetch_one(&mut *conn)
            .within(settings.statement_timeout)
            .await?;
        self.wait_for(conn, settings, stop, holders).await
    }

    /// Waits until every transaction among `holders` (read just now) has ended, or has
    /// held its events longer than `order_wait_limit`; true if told to stop meanwhile.
    async fn wait_for(
        &mut self,
        conn: &mut PgConnection,
        settings: &RelaySettings,
        stop: &mut watch::Receiver<bool>,
        holders: Vec<Vxid>,
    ) -> Result<bool, sqlx::Error> {
        self.given_up.retain(|vxid| holders.contains(vxid));
        let mut waiting: Vec<Vxid> = holders
            .into_iter()
            .filter(|vxid| !self.given_up.contains(vxid))
            .collect();
        if waiting.is_empty() {
            return Ok(false);
        }
        self.give_up_on_old_prepared(conn, settings, &mut waiting)
            .await?;
        if waiting.is_empty() {
            return Ok(false);
        }
        let given_up: Vec<Vxid> = self.given_up.iter().cloned().collect();
        let deadline = Instant::now() + settings.order_wait_limit;
        let mut pace = Pace::default();
        loop {
            let still: i64 = sqlx::query_scalar(STILL_HOLDING)
                .bind(&waiting)
                .bind(&given_up)
                .fetch_one(&mut *conn)
                .within(settings.statement_timeout)
                .await?;
            if still == 0 {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    transactions = ?waiting,
                    "a transaction has held earlier outbox events uncommitted for longer than \
                     order_wait_limit; publishing later events ahead of them"
                );
                self.given_up.extend(waiting.drain(..));
                self.held = true;
                return Ok(false);
            }
            let stopped = match pace.next() {
                None => *stop.borrow(),
                Some(pause) => sleep_or_stop(stop, pause).await,
            };
            if stopped {
                return Ok(true);
            }
        }
    }
}

impl Fence {
    /// Moves the transactions among `waiting` that were prepared longer than
    /// `order_wait_limit` ago to the given-up ones: no one may ever commit them.
    async fn give_up_on_old_prepared(
        &mut self,
        conn: &mut PgConnection,
        settings: &RelaySettings,
        waiting: &mut Vec<Vxid>,
    ) -> Result<(), sqlx::Error> {
        let old: Vec<Vxid> = sqlx::query_scalar(PREPARED_LONG_AGO)
            .bind(i64::try_from(settings.order_wait_limit.as_micros()).unwrap_or(i64::MAX))
            .fetch_one(&mut *conn)
            .within(settings.statement_timeout)
            .await?;
        let (orphans, rest): (Vec<Vxid>, Vec<Vxid>) =
            waiting.drain(..).partition(|vxid| old.contains(vxid));
        *waiting = rest;
        if !orphans.is_empty() {
            tracing::warn!(
                transactions = ?orphans,
                "a transaction prepared longer than order_wait_limit ago holds outbox \
                 events; publishing later events ahead of them (COMMIT PREPARED or \
                 ROLLBACK PREPARED it: see pg_prepared_xacts)"
            );
            self.given_up.extend(orphans);
            self.held = true;
        }
        Ok(())
    }
}

/// How often to look again while waiting for writers. Most end within a millisecond:
/// look again at once a few times (a look is one round trip, a fraction of a
/// millisecond; tokio's timer cannot sleep less than a millisecond), then sleep 1 ms,
/// doubling up to 5 ms.
#[derive(Debug)]
struct Pace {
    quick_looks: u32,
    pause: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            quick_looks: 4,
            pause: Duration::from_millis(1),
        }
    }
}

impl Pace {
    /// The pause before the next look: `None` to look at once.
    fn next(&mut self) -> Option<Duration> {
        if self.quick_looks > 0 {
            self.quick_looks -= 1;
            return None;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Duration::from_millis(5));
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_looks_at_once_then_sleeps_doubling_to_5ms() {
        let mut pace = Pace::default();
        let looks: Vec<Option<u64>> = (0..9)
            .map(|_| pace.next().map(|d| d.as_millis() as u64))
            .collect();
        assert_eq!(
            looks,
            [
                None,
                None,
                None,
                None,
                Some(1),
                Some(2),
                Some(4),
                Some(5),
                Some(5)
            ]
        );
    }

    #[test]
    fn held_until_a_reread_after_every_given_up_writer_ended() {
        let mut fence = Fence::default();
        assert!(!fence.held() && !fence.reread_due());
        fence.given_up.insert(Vxid("3/7".into()));
        fence.held = true;
        assert!(fence.held() && !fence.reread_due());
        // The writer ended: the next read starts at the mark, and then the hold ends.
        fence.given_up.clear();
        assert!(fence.reread_due());
        fence.reread_done();
        assert!(!fence.held());
    }

    #[test]
    fn statements_name_the_outbox_and_keep_the_empty_array_literal() {
        assert!(HOLDERS.contains("coalesce(array_agg(DISTINCT virtualtransaction), '{}')"));
        assert!(HOLDERS.contains("relation = 'edupulse.outbox'::regclass"));
        assert!(FENCE_AND_HOLDERS.ends_with("FROM edupulse.outbox_seq_seq AS s"));
    }
}
