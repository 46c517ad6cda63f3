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
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::fmt;
use std::str::FromStr;
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

/// Why a message went to the dead-letter table, as [`DeadLetter::reason`] says.
///
/// Stored in the table as text ([`DeadReason::as_str`]); new reasons may be added, so
/// a `match` needs a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadReason {
    /// The handler failed on every delivery, up to `max_deliveries`
    /// (`handler_failed`).
    HandlerFailed,
    /// The message lacks a header the consumer needs (`ce-type`, a valid `ce-id`, a
    /// numeric `ce-eventversion`), or its payload does not decode as the event type
    /// (`undecodable`).
    Undecodable,
    /// The group has no handler for the event name (`unknown_event`).
    UnknownEvent,
    /// The group's handler takes another version of the event (`unknown_version`).
    UnknownVersion,
}

impl DeadReason {
    /// Every reason, in declaration order.
    const ALL: [DeadReason; 4] = [
        DeadReason::HandlerFailed,
        DeadReason::Undecodable,
        DeadReason::UnknownEvent,
        DeadReason::UnknownVersion,
    ];

    /// The text the dead-letter table stores: `handler_failed`, `undecodable`,
    /// `unknown_event` or `unknown_version`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::HandlerFailed => "handler_failed",
            DeadReason::Undecodable => "undecodable",
            DeadReason::UnknownEvent => "unknown_event",
            DeadReason::UnknownVersion => "unknown_version",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeadReason {
    type Err = ParseDeadReasonError;

    /// Reads the text the table stores (see [`DeadReason::as_str`]).
    fn from_str(text: &str) -> Result<DeadReason, ParseDeadReasonError> {
        DeadReason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == text)
            .ok_or_else(|| ParseDeadReasonError(text.to_owned()))
    }
}

/// Text that names no [`DeadReason`]: a record written by a newer version of the
/// library, say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dead-letter reason {0:?}; this version of edupulse-events knows handler_failed, undecodable, unknown_event and unknown_version")]
pub struct ParseDeadReasonError(String);

impl ParseDeadReasonError {
    /// The text that was read.
    pub fn text(&self) -> &str {
        &self.0
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
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The record's id.
    pub id: i64,
    /// The consumer group.
    pub consumer_group: String,
    /// Why it was given up on.
    pub reason: DeadReason,
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

/// Shows the payload as text when it is UTF-8 (JSON, normally), else its size.
impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("id", &self.id)
            .field("consumer_group", &self.consumer_group)
            .field("reason", &self.reason)
            .field("error", &self.error)
            .field("event_id", &self.event_id)
            .field("event_name", &self.event_name)
            .field("subject", &self.subject)
            .field("stream_sequence", &self.stream_sequence)
            .field("deliveries", &self.deliveries)
            .field("payload", &Payload(&self.payload))
            .finish()
    }
}

/// A payload in [`DeadLetter`]'s `Debug`.
struct Payload<'a>(&'a [u8]);

impl fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(text) => fmt::Debug::fmt(text, f),
            Err(_) => write!(f, "<{} bytes, not UTF-8>", self.0.len()),
        }
    }
}

/// Reads a stored reason. A text this version does not know (a newer version of the
/// library wrote it, sharing the database) is a decode error of the column, which
/// names the text, rather than a guess: the listing fails, clearly, instead of
/// mislabelling a record, and [`DeadReason`] stays a plain `Copy` enum.
fn reason_of(row: &PgRow) -> Result<DeadReason, sqlx::Error> {
    let text: String = row.try_get("reason")?;
    text.parse().map_err(|error| sqlx::Error::ColumnDecode {
        index: "reason".to_owned(),
        source: Box::new(error),
    })
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
                    reason: reason_of(row)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_stored_text() {
        let stored = [
            "handler_failed",
            "undecodable",
            "unknown_event",
            "unknown_version",
        ];
        for (reason, text) in DeadReason::ALL.into_iter().zip(stored) {
            assert_eq!(reason.as_str(), text);
            assert_eq!(reason.to_string(), text);
            assert_eq!(text.parse::<DeadReason>(), Ok(reason));
        }
    }

    #[test]
    fn unknown_reason_text_is_an_error_that_names_it() {
        let error = "poison_pill".parse::<DeadReason>().unwrap_err();
        assert_eq!(error.text(), "poison_pill");
        assert!(error.to_string().contains("\"poison_pill\""), "{error}");
        assert!("Handler_Failed".parse::<DeadReason>().is_err());
        assert!("".parse::<DeadReason>().is_err());
    }

    fn letter(payload: &[u8]) -> DeadLetter {
        DeadLetter {
            id: 7,
            consumer_group: "grading".to_owned(),
            reason: DeadReason::Undecodable,
            error: "bad".to_owned(),
            event_id: None,
            event_name: Some("lesson.published".to_owned()),
            subject: "edupulse.lesson.published".to_owned(),
            stream_sequence: 3,
            deliveries: 1,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn debug_shows_a_utf8_payload_as_text_and_another_by_its_size() {
        let text = format!("{:?}", letter(br#"{"lesson_id":7}"#));
        assert!(text.contains(r#"payload: "{\"lesson_id\":7}""#), "{text}");
        assert!(text.contains("reason: Undecodable"), "{text}");
        let binary = format!("{:?}", letter(&[0xff, 0xfe, 0x00]));
        assert!(binary.contains("payload: <3 bytes, not UTF-8>"), "{binary}");
    }
}
