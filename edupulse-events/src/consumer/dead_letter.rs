//! The dead-letter table: what is recorded about a message a group cannot handle, the
//! writing of the record (then the message is terminated), and
//! [`EventService::dead_letters`], which lists them.

use super::context::Ctx;
use super::envelope::{header, Envelope};
use super::lane::wait_in_lane;
use crate::service::EventService;
use crate::support::retry::backoff;
use crate::support::sql::DEAD_LETTERS;
use crate::wire::headers;
use async_nats::jetstream::{AckKind, Message};
use const_format::formatcp;
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use uuid::Uuid;

/// Records a message a group gave up on.
const INSERT_DEAD_LETTER: &str = formatcp!(
    "INSERT INTO {DEAD_LETTERS}
        (consumer_group, reason, error, event_id, event_name, subject, stream_sequence,
         deliveries, headers, payload)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
);

/// A group's dead letters, oldest first.
const LIST_DEAD_LETTERS: &str = formatcp!(
    "SELECT id, consumer_group, reason, error, event_id, event_name, subject,
            stream_sequence, deliveries, payload
     FROM {DEAD_LETTERS} WHERE consumer_group = $1 ORDER BY id LIMIT $2"
);

/// Why a message goes to the dead-letter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeadReason {
    /// The handler failed on the last delivery.
    HandlerFailed,
    /// The message lacks a header it needs, or its payload does not decode.
    Undecodable,
    /// The group has no handler for the event name.
    UnknownEvent,
    /// The group's handler takes another version of the event.
    UnknownVersion,
}

impl DeadReason {
    /// The text the table stores.
    fn as_str(self) -> &'static str {
        match self {
            DeadReason::HandlerFailed => "handler_failed",
            DeadReason::Undecodable => "undecodable",
            DeadReason::UnknownEvent => "unknown_event",
            DeadReason::UnknownVersion => "unknown_version",
        }
    }
}

/// What the dead-letter table records about a message.
pub(super) struct DeadRecord<'a> {
    /// Why.
    pub reason: DeadReason,
    /// What went wrong.
    pub why: &'a str,
    /// The envelope, when the message had one.
    pub envelope: Option<&'a Envelope>,
    /// How many deliveries it had.
    pub deliveries: u32,
    /// The message's stream sequence.
    pub sequence: u64,
}

/// Records a message in the dead-letter table, then terminates it. If the record
/// cannot be written, it is tried again in the lane, with backoff and progress (later
/// events of the subject wait behind it), until it is written or the instance stops
/// (the message is then handed back).
pub(super) async fn dead_letter(
    ctx: &Ctx,
    message: &Message,
    stop: &mut watch::Receiver<bool>,
    record: DeadRecord<'_>,
) {
    let headers = headers_json(message);
    let mut failures: i32 = 0;
    loop {
        match write(ctx, message, &record, &headers).await {
            Ok(()) => {
                ctx.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    group = %ctx.group, reason = record.reason.as_str(), subject = %message.subject,
                    error = %record.why, "message moved to the dead-letter table"
                );
                if let Err(error) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(%error, "could not terminate a dead-lettered message");
                }
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = backoff(ctx.settings.retry_base, ctx.settings.retry_max, failures);
                tracing::error!(
                    %error, group = %ctx.group, retry_in = ?delay,
                    "cannot write the dead-letter record; trying again (later events of the \
                     subject wait)"
                );
                if wait_in_lane(ctx, message, stop, delay).await {
                    return;
                }
            }
        }
    }
}

/// The message's headers as a JSON object, the first value of each.
fn headers_json(message: &Message) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .map(|(name, values)| {
                    let value = values.first().map(|v| v.as_str()).unwrap_or("");
                    (name.to_string(), serde_json::Value::from(value))
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::Value::Object(headers)
}

/// Writes the record once.
async fn write(
    ctx: &Ctx,
    message: &Message,
    record: &DeadRecord<'_>,
    headers: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    let envelope = record.envelope;
    sqlx::query(INSERT_DEAD_LETTER)
        .bind(&ctx.group)
        .bind(record.reason.as_str())
        .bind(record.why)
        .bind(envelope.map(|e| e.id))
        .bind(
            envelope
                .map(|e| e.name.as_str())
                .or(header(message, headers::TYPE)),
        )
        .bind(message.subject.as_str())
        .bind(i64::try_from(record.sequence).unwrap_or(i64::MAX))
        .bind(i32::try_from(record.deliveries).unwrap_or(i32::MAX))
        .bind(headers)
        .bind(message.payload.as_ref())
        .execute(&ctx.inner.pool)
        .await?;
    Ok(())
}

/// A message a consumer group could not handle, as [`EventService::dead_letters`]
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The record's id.
    pub id: i64,
    /// The consumer group.
    pub consumer_group: String,
    /// `handler_failed`, `undecodable`, `unknown_event` or `unknown_version`.
    pub reason: String,
    /// What went wrong.
    pub error: String,
    /// The event id, when the message had a valid one.
    pub event_id: Option<Uuid>,
    /// The event name, when the message had one.
    pub event_name: Option<String>,
    /// The full NATS subject.
    pub subject: String,
    /// The message's stream sequence.
    pub stream_sequence: i64,
    /// How many deliveries it had.
    pub deliveries: i32,
    /// The raw body.
    pub payload: Vec<u8>,
}

impl EventService {
    /// Lists the dead letters of `group`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// The Postgres error, if the query failed.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, sqlx::Error> {
        use sqlx::Row;
        let rows = sqlx::query(LIST_DEAD_LETTERS)
            .bind(group)
            .bind(limit)
            .fetch_all(&self.inner.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: row.try_get("id")?,
                    consumer_group: row.try_get("consumer_group")?,
                    reason: row.try_get("reason")?,
                    error: row.try_get("error")?,
                    event_id: row.try_get("event_id")?,
                    event_name: row.try_get("event_name")?,
                    subject: row.try_get("subject")?,
                    stream_sequence: row.try_get("stream_sequence")?,
                    deliveries: row.try_get("deliveries")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }
}
