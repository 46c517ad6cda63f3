//! Looking at the outbox and acting on it: what is pending or dead, where one event
//! stands, and putting dead events back in line.

use super::Emitter;
use crate::support::pg::is_undefined_table;
use crate::support::sql::{NOTIFY, OUTBOX, OUTBOX_SEQ, PENDING_EVENTS, RELAY_PROGRESS};
use const_format::formatcp;
use sqlx::Row;
use std::fmt;
use std::time::Duration;
use uuid::Uuid;

const STATUS: &str = formatcp!(
    "SELECT
        (SELECT count(*) FROM {PENDING_EVENTS}) AS pending,
        (SELECT count(*) FROM {OUTBOX} WHERE status = 'dead') AS dead,
        oldest.seq AS oldest_seq,
        extract(epoch FROM (clock_timestamp() - oldest.occurred_at))::float8 AS age,
        progress.foreign_messages,
        extract(epoch FROM (clock_timestamp() - progress.foreign_seen_at))::float8
            AS foreign_age
     FROM {RELAY_PROGRESS} AS progress
     LEFT JOIN LATERAL (
        SELECT seq, occurred_at FROM {PENDING_EVENTS} ORDER BY seq LIMIT 1
     ) AS oldest ON true"
);

const DEAD_EVENTS: &str = formatcp!(
    "SELECT id, name, subject, attempts, last_error FROM {OUTBOX}
     WHERE status = 'dead' ORDER BY seq LIMIT $1"
);

/// Each requeued event gets a new sequence number, in the order they had.
const REQUEUE_DEAD: &str = formatcp!(
    "WITH dead AS (
        SELECT seq FROM {OUTBOX}
        WHERE status = 'dead' AND ($1::uuid[] IS NULL OR id = ANY($1))
        ORDER BY seq
        FOR UPDATE
     ),
     renumbered AS (
        SELECT seq AS old, pg_catalog.nextval('{OUTBOX_SEQ}') AS new
        FROM (SELECT seq FROM dead ORDER BY seq) AS ordered
     )
     UPDATE {OUTBOX} AS o
     SET seq = r.new, status = 'pending', attempts = 0, next_attempt_at = now()
     FROM renumbered AS r
     WHERE o.seq = r.old"
);

/// Whether the event is dead, and whether it is published (marked one by one, or at or
/// below the relay's mark).
const EVENT_STATE: &str = formatcp!(
    "SELECT o.status = 'dead',
            o.status = 'published' OR (o.status = 'pending' AND o.seq <= p.published_through)
     FROM {OUTBOX} AS o, {RELAY_PROGRESS} AS p
     WHERE o.id = $1"
);

/// The state of the outbox, as [`Emitter::outbox_status`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Committed events not yet published.
    pub pending: i64,
    /// Events JetStream rejected for good; see [`Emitter::requeue_dead`].
    pub dead: i64,
    /// How long the oldest pending event has waited; zero when none is pending.
    pub oldest_pending_age: Duration,
    /// The sequence number of the oldest pending event.
    pub oldest_pending_seq: Option<i64>,
    /// How many messages of other publishers the relay has found in its stream. They
    /// are tolerated (the relay then publishes one event at a time, slower but in
    /// order) but should not be there: give the service a prefix and stream of its own.
    pub foreign_messages: i64,
    /// How long ago the relay last found one; `None` if never.
    pub last_foreign_message_age: Option<Duration>,
}

/// A call that reads or changes the outbox failed.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The outbox tables do not exist yet.
    #[error("the outbox tables (schema edupulse) do not exist; call migrate() at start-up (EventService::migrate or Emitter::migrate)")]
    NotMigrated,
    /// Postgres failed.
    #[error("reading the outbox failed: {0}; check that Postgres answers and that the role has the grants in grants_sql()")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for OutboxError {
    fn from(error: sqlx::Error) -> Self {
        if is_undefined_table(&error) {
            OutboxError::NotMigrated
        } else {
            OutboxError::Database(error)
        }
    }
}

impl fmt::Display for OutboxStatus {
    /// One line: `12 pending (oldest 1.2 s, sequence 3456), 0 dead`, and the foreign
    /// messages when there were any.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} pending", self.pending)?;
        if let Some(seq) = self.oldest_pending_seq {
            write!(
                f,
                " (oldest {:.1} s, sequence {seq})",
                self.oldest_pending_age.as_secs_f64()
            )?;
        }
        write!(f, ", {} dead", self.dead)?;
        if self.foreign_messages > 0 {
            write!(
                f,
                ", {} foreign messages in the stream",
                self.foreign_messages
            )?;
            if let Some(age) = self.last_foreign_message_age {
                write!(f, " (last {:.0} s ago)", age.as_secs_f64())?;
            }
        }
        Ok(())
    }
}

/// Which dead events [`Emitter::requeue_dead`] puts back in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Every dead event.
    All,
    /// The dead events with these ids (others are left alone).
    Ids(Vec<Uuid>),
}

/// A dead event, as [`Emitter::dead_events`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadEvent {
    /// The event id.
    pub id: Uuid,
    /// The event name.
    pub name: String,
    /// The relative subject.
    pub subject: String,
    /// How many publishes were tried.
    pub attempts: i32,
    /// Why JetStream rejected it.
    pub last_error: Option<String>,
}

impl Emitter {
    /// Counts pending and dead events and measures the oldest pending one.
    ///
    /// # Errors
    /// [`OutboxError`]: `NotMigrated` before [`migrate`](Emitter::migrate), else
    /// the Postgres error.
    pub async fn outbox_status(&self) -> Result<OutboxStatus, OutboxError> {
        let row = sqlx::query(STATUS).fetch_one(&self.inner.pool).await?;
        let age: Option<f64> = row.try_get("age")?;
        Ok(OutboxStatus {
            pending: row.try_get("pending")?,
            dead: row.try_get("dead")?,
            oldest_pending_seq: row.try_get("oldest_seq")?,
            oldest_pending_age: Duration::from_secs_f64(age.unwrap_or(0.0).max(0.0)),
            foreign_messages: row.try_get("foreign_messages")?,
            last_foreign_message_age: row
                .try_get::<Option<f64>, _>("foreign_age")?
                .map(|age| Duration::try_from_secs_f64(age.max(0.0)).unwrap_or(Duration::ZERO)),
        })
    }

    /// Lists dead events, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`OutboxError`]: `NotMigrated` before [`migrate`](Emitter::migrate), else
    /// the Postgres error.
    pub async fn dead_events(&self, limit: i64) -> Result<Vec<DeadEvent>, OutboxError> {
        let rows = sqlx::query(DEAD_EVENTS)
            .bind(limit)
            .fetch_all(&self.inner.pool)
            .await?;
        let dead: Result<Vec<DeadEvent>, sqlx::Error> = rows
            .iter()
            .map(|row| {
                Ok(DeadEvent {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    subject: row.try_get("subject")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect();
        Ok(dead?)
    }

    /// Puts dead events back in line for the relay; returns how many.
    ///
    /// # Errors
    /// [`OutboxError`]: `NotMigrated` before [`migrate`](Emitter::migrate), else
    /// the Postgres error.
    pub async fn requeue_dead(&self, which: Requeue) -> Result<u64, OutboxError> {
        // Each gets a new sequence number, in the order they had: the relay's mark
        // (`published_through`) may be past their old one, and they are published after
        // everything emitted so far anyway.
        let ids = match which {
            Requeue::All => None,
            Requeue::Ids(ids) => Some(ids),
        };
        let mut tx = self.inner.pool.begin().await?;
        let result = sqlx::query(REQUEUE_DEAD)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(NOTIFY).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(result.rows_affected())
    }

    /// Where one event stands in the outbox: `None` if it is not there (never
    /// committed, or published and pruned after the retention).
    ///
    /// # Errors
    /// [`OutboxError`]: `NotMigrated` before [`migrate`](Emitter::migrate), else
    /// the Postgres error.
    pub async fn event_state(&self, id: Uuid) -> Result<Option<EventState>, OutboxError> {
        let state: Option<(bool, bool)> = sqlx::query_as(EVENT_STATE)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await?;
        Ok(state.map(|(dead, published)| match (dead, published) {
            (true, _) => EventState::Dead,
            (false, true) => EventState::Published,
            (false, false) => EventState::Pending,
        }))
    }
}

/// Where an event stands in the outbox, as [`Emitter::event_state`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventState {
    /// Committed, not yet published.
    Pending,
    /// In the stream, acknowledged by JetStream.
    Published,
    /// JetStream rejected it for good; see [`Emitter::requeue_dead`].
    Dead,
}

crate::support::debug_as_display!(OutboxError);
