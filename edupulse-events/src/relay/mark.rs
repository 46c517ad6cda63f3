//! Marking what JetStream acknowledged: dead events by their status, published ones by
//! moving the relay's mark past them (or, while the fence is held, one by one), on a
//! connection of its own while the leader reads and publishes the next batch.

use super::prune::Pruner;
use super::publish::Failure;
use super::read::OutboxRow;
use super::RelayState;
use crate::relay::RelaySettings;
use crate::support::pg::{open_session, Within};
use crate::support::retry::backoff;
use crate::support::sql::{OUTBOX, RELAY_PROGRESS};
use const_format::formatcp;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;

const MARKER_START: &str = formatcp!(
    "SELECT pg_catalog.pg_backend_pid(), (SELECT published_through FROM {RELAY_PROGRESS})"
);

const MARK_THROUGH: &str = formatcp!(
    "UPDATE {RELAY_PROGRESS}
     SET published_through = greatest(published_through, $1), updated_at = now()"
);

/// With retention zero: everything after the last mark (`$2`) is published (or dead,
/// and kept), and goes.
const MARK_THROUGH_DELETING: &str = formatcp!(
    "WITH gone AS (
        DELETE FROM {OUTBOX}
        WHERE seq > $2 AND seq <= $1 AND status <> 'dead')
     UPDATE {RELAY_PROGRESS}
     SET published_through = greatest(published_through, $1), updated_at = now()"
);

const MARK_ROWS: &str =
    formatcp!("UPDATE {OUTBOX} SET status = 'published', published_at = now() WHERE seq = ANY($1)");

const DELETE_ROWS: &str = formatcp!("DELETE FROM {OUTBOX} WHERE seq = ANY($1)");

const MARK_DEAD: &str = formatcp!(
    "UPDATE {OUTBOX}
     SET status = 'dead', attempts = attempts + 1, last_error = $2
     WHERE seq = $1"
);

const RECORD_FAILURE: &str = formatcp!(
    "UPDATE {OUTBOX}
     SET attempts = attempts + 1, last_error = $2,
         next_attempt_at = clock_timestamp() + $3 * interval '1 microsecond'
     WHERE seq = $1"
);

/// What one mark records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mark {
    /// Every event up to this seq is published or dead: one update of
    /// `relay_progress` (with retention zero, the range is also deleted).
    /// `published` counts the events published (the rest were dead).
    Through { seq: i64, published: u64 },
    /// These events are published, each marked by its status: while the fence is held
    /// (see [`Fence`](super::fence::Fence)).
    Rows(Vec<i64>),
}

impl Mark {
    /// The highest seq it covers.
    pub fn last(&self) -> Option<i64> {
        match self {
            Mark::Through { seq, .. } => Some(*seq),
            Mark::Rows(rows) => rows.last().copied(),
        }
    }

    /// How many events it marks as published.
    pub fn published(&self) -> u64 {
        match self {
            Mark::Through { published, .. } => *published,
            Mark::Rows(rows) => rows.len() as u64,
        }
    }
}

/// A batch's results, sorted: in order, up to the first event that must wait.
pub(super) struct Sorted<'b> {
    /// Published, by seq.
    pub published: Vec<i64>,
    /// Refused for good, with why.
    pub dead: Vec<(&'b OutboxRow, String)>,
    /// The first event that failed and may succeed later; the rest of the batch waits.
    pub retry: Option<(&'b OutboxRow, String)>,
    /// The first event sent out of its chain; sent again first in the next batch.
    pub out_of_chain: Option<(&'b OutboxRow, String)>,
    /// The last event of the done part of the batch (published or dead).
    pub done_through: Option<i64>,
}

/// Sorts one result per row (as [`publish`](super::publish::publish) returns them).
pub(super) fn sort(batch: &[OutboxRow], outcome: Vec<Result<(), Failure>>) -> Sorted<'_> {
    let mut sorted = Sorted {
        published: Vec::new(),
        dead: Vec::new(),
        retry: None,
        out_of_chain: None,
        done_through: None,
    };
    for (row, result) in batch.iter().zip(outcome) {
        match result {
            Ok(()) => sorted.published.push(row.seq),
            Err(Failure::Permanent(why)) => sorted.dead.push((row, why)),
            Err(Failure::Transient(why)) => {
                sorted.retry = Some((row, why));
                break;
            }
            Err(Failure::OutOfChain(why)) => {
                sorted.out_of_chain = Some((row, why));
                break;
            }
        }
        sorted.done_through = Some(row.seq);
    }
    sorted
}

impl Sorted<'_> {
    /// The mark that records the done part: past it all, or (while `held`) row by row.
    pub fn mark(&self, held: bool) -> Mark {
        match self.done_through {
            Some(_) if held => Mark::Rows(self.published.clone()),
            Some(seq) => Mark::Through {
                seq,
                published: self.published.len() as u64,
            },
            None => Mark::Rows(Vec::new()),
        }
    }
}

/// Records events JetStream refused for good as dead, before the mark passes them: an
/// event at or below the mark that is not dead counts as published.
pub(super) async fn record_dead(
    conn: &mut PgConnection,
    dead: &[(&OutboxRow, String)],
    limit: Duration,
) -> Result<(), sqlx::Error> {
    for (row, why) in dead {
        tracing::error!(
            id = %row.id, event = %row.name, seq = row.seq, error = %why,
            "JetStream rejected an event for good; it is dead (see requeue_dead)"
        );
        sqlx::query(MARK_DEAD)
            .bind(row.seq)
            .bind(why)
            .execute(&mut *conn)
            .within(limit)
            .await?;
    }
    Ok(())
}

/// Records a failed publish and when to try again; returns the delay.
pub(super) async fn record_failure(
    conn: &mut PgConnection,
    settings: &RelaySettings,
    row: &OutboxRow,
    why: &str,
) -> Result<Duration, sqlx::Error> {
    let delay = backoff(
        settings.retry_base,
        settings.retry_max,
        row.attempts.saturating_add(1),
    );
    tracing::warn!(
        id = %row.id, event = %row.name, seq = row.seq, attempt = row.attempts + 1,
        retry_in = ?delay, error = %why,
        "publishing failed; later events wait behind it"
    );
    sqlx::query(RECORD_FAILURE)
        .bind(row.seq)
        .bind(why)
        .bind(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .within(settings.statement_timeout)
        .await?;
    Ok(delay)
}

/// Marks published events on a connection of its own, while the leader reads and
/// publishes the next batch: a commit waits for the WAL flush. One mark is in flight
/// at most; the batch read meanwhile starts after it, and the fence does not wait for
/// its transaction.
pub(super) struct Marker {
    conn: Option<PgConnection>,
    /// The marking connection's backend.
    pid: i32,
    retention_zero: bool,
    pg_options: PgConnectOptions,
    /// How long a statement may take (`statement_timeout`).
    limit: Duration,
    /// `relay_progress.published_through` as this relay last wrote or read it: every
    /// pending event at or below it is published.
    through: i64,
    /// The mark in flight, and the task writing it (it hands the connection back), or
    /// what the task returned once [`Marker::written`] saw it end.
    in_flight: Option<Mark>,
    task: Option<JoinHandle<MarkDone>>,
    done: Option<Result<MarkDone, tokio::task::JoinError>>,
}

type MarkDone = (PgConnection, Result<(), sqlx::Error>);

impl Marker {
    /// Opens the marking connection and reads the mark.
    pub async fn open(
        pg_options: &PgConnectOptions,
        settings: &RelaySettings,
    ) -> Result<Marker, sqlx::Error> {
        let mut marker = Marker {
            conn: None,
            pid: 0,
            retention_zero: settings.retention.is_zero(),
            pg_options: pg_options.clone(),
            limit: settings.statement_timeout,
            through: 0,
            in_flight: None,
            task: None,
            done: None,
        };
        marker.connect().await?;
        Ok(marker)
    }

    async fn connect(&mut self) -> Result<(), sqlx::Error> {
        let mut conn = open_session(&self.pg_options, self.limit).await?;
        let (pid, through): (i32, i64) = sqlx::query_as(MARKER_START)
            .fetch_one(&mut conn)
            .within(self.limit)
            .await?;
        self.pid = pid;
        self.through = self.through.max(through);
        self.conn = Some(conn);
        Ok(())
    }

    /// The marking connection's backend, which the fence does not wait for.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The relay's mark as last written or read.
    pub fn through(&self) -> i64 {
        self.through
    }

    /// Where the next read starts: after the mark in flight, or else after the mark.
    /// Every pending event at or below it is published or being marked (a failed mark
    /// sets it back, so its events are read and sent again).
    pub fn read_after(&self) -> i64 {
        self.in_flight
            .as_ref()
            .and_then(Mark::last)
            .unwrap_or(0)
            .max(self.through)
    }

    /// Whether no mark is in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    /// Waits until the mark in flight has been written; cancel-safe (it only waits, and
    /// keeps what the task returned for [`Marker::settle`]).
    pub async fn written(&mut self) {
        if let Some(task) = self.task.as_mut() {
            let done = task.await;
            self.task = None;
            self.done = Some(done);
        }
    }

    /// Waits for the mark in flight, if any, and counts what it marked.
    pub async fn settle(&mut self, state: &RelayState, pruner: &mut Pruner) {
        let done = match (self.done.take(), self.task.take()) {
            (Some(done), _) => done,
            (None, Some(task)) => task.await,
            (None, None) => return,
        };
        let Some(marked) = self.in_flight.take() else {
            return;
        };
        match done {
            Ok((conn, Ok(()))) => {
                self.conn = Some(conn);
                state
                    .published
                    .fetch_add(marked.published(), Ordering::SeqCst);
                if let Mark::Through { seq, .. } = marked {
                    self.through = self.through.max(seq);
                }
                if let Some(last) = marked.last() {
                    pruner.published_up_to(last);
                }
            }
            Ok((_, Err(error))) => {
                // The events stay pending: they are published again (JetStream keeps
                // one copy) and marked then.
                tracing::warn!(%error, events = marked.published(), "relay could not mark published events; they will be sent again");
            }
            Err(error) => {
                tracing::warn!(%error, "relay's marking task failed; the events will be sent again");
            }
        }
    }

    /// Starts writing `mark` (after the mark in flight, if any, has ended).
    pub async fn start(
        &mut self,
        mark: Mark,
        state: &RelayState,
        pruner: &mut Pruner,
    ) -> Result<(), sqlx::Error> {
        self.settle(state, pruner).await;
        if mark.last().is_none() {
            return Ok(());
        }
        if self.conn.is_none() {
            self.connect().await?;
        }
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let statement = match &mark {
            Mark::Through { seq, .. } if self.retention_zero => sqlx::query(MARK_THROUGH_DELETING)
                .bind(*seq)
                .bind(self.through),
            Mark::Through { seq, .. } => sqlx::query(MARK_THROUGH).bind(*seq),
            Mark::Rows(rows) if self.retention_zero => sqlx::query(DELETE_ROWS).bind(rows.clone()),
            Mark::Rows(rows) => sqlx::query(MARK_ROWS).bind(rows.clone()),
        };
        self.in_flight = Some(mark);
        let limit = self.limit;
        self.task = Some(tokio::spawn(async move {
            let done = statement.execute(&mut conn).within(limit).await;
            (conn, done.map(|_| ()))
        }));
        Ok(())
    }

    /// Closes the marking connection.
    pub async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().within(self.limit).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use uuid::Uuid;

    fn row(seq: i64) -> OutboxRow {
        OutboxRow {
            seq,
            id: Uuid::now_v7(),
            name: "a.b".into(),
            version: 1,
            subject: "a.b".into(),
            payload: "{}".into(),
            source: "test".into(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            occurred_at: OffsetDateTime::UNIX_EPOCH,
            attempts: 0,
            wait_secs: 0.0,
        }
    }

    #[test]
    fn the_mark_stops_at_the_first_event_that_must_wait() {
        let batch: Vec<OutboxRow> = (1..=5).map(row).collect();
        let outcome = vec![
            Ok(()),
            Err(Failure::Permanent("too large".into())),
            Ok(()),
            Err(Failure::Transient("timed out".into())),
            Ok(()),
        ];
        let sorted = sort(&batch, outcome);
        assert_eq!(sorted.published, [1, 3]);
        assert_eq!(sorted.dead.len(), 1);
        assert_eq!(sorted.dead[0].0.seq, 2);
        assert_eq!(sorted.retry.as_ref().map(|r| r.0.seq), Some(4));
        assert_eq!(sorted.done_through, Some(3));
        // Past the dead one too: it is marked dead before the mark moves.
        assert_eq!(
            sorted.mark(false),
            Mark::Through {
                seq: 3,
                published: 2
            }
        );
        assert_eq!(sorted.mark(true), Mark::Rows(vec![1, 3]));
    }

    #[test]
    fn an_event_out_of_chain_ends_the_done_part() {
        let batch: Vec<OutboxRow> = (7..=9).map(row).collect();
        let outcome = vec![
            Err(Failure::OutOfChain("wrong last".into())),
            Ok(()),
            Ok(()),
        ];
        let sorted = sort(&batch, outcome);
        assert!(sorted.published.is_empty());
        assert_eq!(sorted.out_of_chain.as_ref().map(|r| r.0.seq), Some(7));
        assert_eq!(sorted.done_through, None);
        assert_eq!(sorted.mark(false), Mark::Rows(Vec::new()));
        assert_eq!(sorted.mark(false).last(), None);
    }

    #[test]
    fn a_mark_knows_its_last_seq_and_count() {
        assert_eq!(
            Mark::Through {
                seq: 9,
                published: 4
            }
            .last(),
            Some(9)
        );
        assert_eq!(
            Mark::Through {
                seq: 9,
                published: 4
            }
            .published(),
            4
        );
        assert_eq!(Mark::Rows(vec![2, 5]).last(), Some(5));
        assert_eq!(Mark::Rows(vec![2, 5]).published(), 2);
    }

    #[test]
    fn statements_name_the_library_tables() {
        assert!(MARK_THROUGH.starts_with("UPDATE edupulse.relay_progress"));
        assert!(MARK_THROUGH_DELETING.contains("DELETE FROM edupulse.outbox"));
        assert!(MARKER_START.contains("FROM edupulse.relay_progress"));
    }
}
