//! Reading the next batch: pending events past the fence's wait, in sequence order,
//! bounded by count and by bytes.

use super::fence::Fence;
use crate::relay::RelaySettings;
use crate::support::pg::Within;
use crate::support::sql::OUTBOX;
use crate::wire::Outbound;
use const_format::formatcp;
use sqlx::{PgConnection, Row};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

/// The next pending events up to the fence (`$1`), after `$3`, at most `$2` of them
/// and, after the first, only while the bodies read so far (as stored) stay under `$4`
/// bytes. The columns are read by position in [`OutboxRow`]'s order.
const READ_BATCH: &str = formatcp!(
    "SELECT seq, id, name, version, subject, payload::text AS payload, source, correlation_id,
       causation_id, traceparent, occurred_at, attempts, wait_secs
FROM (
    SELECT seq, id, name, version, subject, payload, source, correlation_id, causation_id,
           traceparent, occurred_at, attempts,
           greatest(0, extract(epoch FROM next_attempt_at - clock_timestamp()))::float8
               AS wait_secs,
           sum(pg_column_size(payload)) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING)
               - pg_column_size(payload)
               AS before
    FROM (
        SELECT * FROM {OUTBOX}
        WHERE status = 'pending' AND seq <= $1 AND seq > $3
        ORDER BY seq
        LIMIT $2
    ) AS next
) AS sized
WHERE before < $4
ORDER BY seq"
);

/// One pending event as the relay reads it.
pub(super) struct OutboxRow {
    pub seq: i64,
    pub id: Uuid,
    pub name: String,
    pub version: i32,
    pub subject: String,
    pub payload: String,
    pub source: String,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub occurred_at: OffsetDateTime,
    pub attempts: i32,
    /// Seconds until the event may be retried (zero: now), by the database's clock.
    pub wait_secs: f64,
}

impl OutboxRow {
    /// What its message's headers are built from.
    pub fn envelope(&self) -> Outbound<'_> {
        Outbound {
            id: self.id,
            name: &self.name,
            version: self.version,
            subject: &self.subject,
            source: &self.source,
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.traceparent.as_deref(),
        }
    }

    /// How long until it may be published again, at most `max`; `None` if now.
    pub fn retry_wait(&self, max: Duration) -> Option<Duration> {
        (self.wait_secs > 0.0).then(|| {
            Duration::try_from_secs_f64(self.wait_secs)
                .unwrap_or(max)
                .min(max)
        })
    }

    fn from_row(row: &sqlx::postgres::PgRow) -> Result<OutboxRow, sqlx::Error> {
        // By position, in READ_BATCH's column order: a lookup by name per column and
        // row shows in the relay's profile.
        Ok(OutboxRow {
            seq: row.try_get(0)?,
            id: row.try_get(1)?,
            name: row.try_get(2)?,
            version: row.try_get(3)?,
            subject: row.try_get(4)?,
            payload: row.try_get(5)?,
            source: row.try_get(6)?,
            correlation_id: row.try_get(7)?,
            causation_id: row.try_get(8)?,
            traceparent: row.try_get(9)?,
            occurred_at: row.try_get(10)?,
            attempts: row.try_get(11)?,
            wait_secs: row.try_get(12)?,
        })
    }
}

/// Reads the next batch up to the fence, of events after `after`; `None` if told to
/// stop while waiting for writers.
pub(super) async fn fetch(
    conn: &mut PgConnection,
    fence: &mut Fence,
    settings: &RelaySettings,
    stop: &mut watch::Receiver<bool>,
    marker_pid: i32,
    after: i64,
) -> Result<Option<Vec<OutboxRow>>, sqlx::Error> {
    let Some(through) = fence.pass(conn, settings, stop, marker_pid).await? else {
        return Ok(None);
    };
    let rows = sqlx::query(READ_BATCH)
        .bind(through)
        .bind(i64::from(settings.batch_size))
        .bind(after)
        .bind(i64::from(settings.batch_bytes))
        .fetch_all(&mut *conn)
        .within(settings.statement_timeout)
        .await?;
    rows.iter()
        .map(OutboxRow::from_row)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
