//! Pruning: deletes published rows older than the retention, in bounded batches,
//! walking the primary key from the oldest row up to the newest row known to be old
//! enough.

use crate::relay::RelaySettings;
use crate::support::pg::Within;
use crate::support::sql::{OUTBOX, RELAY_PROGRESS};
use const_format::formatcp;
use sqlx::PgConnection;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

const NEWEST_PUBLISHED_ROW: &str =
    formatcp!("SELECT seq FROM {OUTBOX} WHERE status = 'published' ORDER BY seq DESC LIMIT 1");

const MARK_AND_AGE: &str = formatcp!(
    "SELECT published_through, greatest(0, extract(epoch FROM now() - updated_at))::float8
     FROM {RELAY_PROGRESS}"
);

/// Up to `$3` rows at or below `$1`: pending ones at or below the aged mark `$4`, and
/// those marked published one by one longer than the retention (`$2` µs) ago.
const PRUNE: &str = formatcp!(
    "DELETE FROM {OUTBOX} WHERE seq IN (
        SELECT seq FROM {OUTBOX}
        WHERE seq <= $1
          AND ((status = 'pending' AND seq <= $4)
               OR (status = 'published'
                   AND published_at < now() - $2 * interval '1 microsecond'))
        ORDER BY seq LIMIT $3)"
);

/// At most this many statements per pruning round, so publishing never waits long.
const STATEMENTS_PER_ROUND: usize = 10;

/// Marks within one slice of the retention (a 64th, at least a second) share one entry:
/// a busy relay marks a batch every few milliseconds, and an entry each would grow the
/// queue to tens of millions over a week's retention.
const SLICES: u32 = 64;

/// Deletes published rows older than the retention.
pub(super) struct Pruner {
    retention: Duration,
    /// (when last marked, highest seq marked then), one entry per slice of the
    /// retention.
    marks: VecDeque<(Instant, i64)>,
    /// When the newest entry's slice began.
    slice_started: Option<Instant>,
    /// Rows up to here may be old enough: those marked one by one are checked by their
    /// `published_at`.
    prunable_up_to: i64,
    /// The highest mark old enough: pending rows up to it (and up to the relay's
    /// `published_through`) were published longer than the retention ago.
    aged_through: i64,
    last_run: Instant,
}

impl Pruner {
    fn new(retention: Duration) -> Pruner {
        Pruner {
            retention,
            marks: VecDeque::new(),
            slice_started: None,
            prunable_up_to: 0,
            aged_through: 0,
            last_run: Instant::now(),
        }
    }

    /// Starts from what a previous leader published: rows marked one by one are
    /// checked by their own time; the mark counts from when it last moved.
    pub async fn start(
        conn: &mut PgConnection,
        settings: &RelaySettings,
    ) -> Result<Pruner, sqlx::Error> {
        let (retention, limit) = (settings.retention, settings.statement_timeout);
        let mut pruner = Pruner::new(retention);
        if retention.is_zero() {
            return Ok(pruner);
        }
        let newest: Option<i64> = sqlx::query_scalar(NEWEST_PUBLISHED_ROW)
            .fetch_optional(&mut *conn)
            .within(limit)
            .await?;
        if let Some(seq) = newest {
            pruner.prunable_up_to = seq;
        }
        let (through, age): (i64, f64) = sqlx::query_as(MARK_AND_AGE)
            .fetch_one(&mut *conn)
            .within(limit)
            .await?;
        let age = Duration::try_from_secs_f64(age).unwrap_or(Duration::ZERO);
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        pruner.marks.push_back((at, through));
        Ok(pruner)
    }

    /// Everything up to `seq` was marked published just now.
    pub fn published_up_to(&mut self, seq: i64) {
        let now = Instant::now();
        let slice = (self.retention / SLICES).max(Duration::from_secs(1));
        if let (Some(started), Some(newest)) = (self.slice_started, self.marks.back_mut()) {
            if now.duration_since(started) < slice {
                // The entry takes the newest time: its rows age from their last mark,
                // so none is pruned before its retention has passed.
                *newest = (now, newest.1.max(seq));
                return;
            }
        }
        self.slice_started = Some(now);
        self.marks.push_back((now, seq));
    }

    /// Takes in the marks that have aged past the retention.
    fn age_marks(&mut self) {
        while let Some((at, seq)) = self.marks.front().copied() {
            if at.elapsed() < self.retention {
                break;
            }
            self.prunable_up_to = self.prunable_up_to.max(seq);
            self.aged_through = self.aged_through.max(seq);
            self.marks.pop_front();
        }
    }

    /// Prunes, if `prune_interval` has passed since the last round. `through` is the
    /// relay's `published_through`.
    pub async fn maybe_prune(
        &mut self,
        conn: &mut PgConnection,
        settings: &RelaySettings,
        through: i64,
    ) -> Result<(), sqlx::Error> {
        if self.retention.is_zero() || self.last_run.elapsed() < settings.prune_interval {
            return Ok(());
        }
        self.last_run = Instant::now();
        self.age_marks();
        if self.prunable_up_to == 0 {
            return Ok(());
        }
        for _ in 0..STATEMENTS_PER_ROUND {
            let deleted = sqlx::query(PRUNE)
                .bind(self.prunable_up_to)
                .bind(i64::try_from(self.retention.as_micros()).unwrap_or(i64::MAX))
                .bind(i64::from(settings.prune_batch))
                .bind(self.aged_through.min(through))
                .execute(&mut *conn)
                .within(settings.statement_timeout)
                .await?
                .rows_affected();
            tracing::debug!(deleted, "relay pruned published events");
            if deleted < u64::from(settings.prune_batch) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_of_one_slice_share_an_entry_so_memory_stays_bounded() {
        let mut pruner = Pruner::new(Duration::from_secs(7 * 24 * 3600));
        for seq in 1..=100_000 {
            pruner.published_up_to(seq);
        }
        assert_eq!(pruner.marks.len(), 1);
        assert_eq!(pruner.marks.back().map(|m| m.1), Some(100_000));
    }

    #[test]
    fn only_marks_older_than_the_retention_make_rows_prunable() {
        let retention = Duration::from_secs(60);
        let mut pruner = Pruner::new(retention);
        let now = Instant::now();
        let Some(old) = now.checked_sub(Duration::from_secs(120)) else {
            return; // A clock this close to its start cannot show an old mark.
        };
        pruner.marks.push_back((old, 10));
        pruner.marks.push_back((old, 25));
        pruner.marks.push_back((now, 40));
        pruner.age_marks();
        assert_eq!(pruner.prunable_up_to, 25);
        assert_eq!(pruner.aged_through, 25);
        assert_eq!(pruner.marks.len(), 1, "the young mark waits");
    }
}
