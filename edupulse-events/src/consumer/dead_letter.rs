//! The dead-letter table: what is recorded about a message a group cannot handle, the
//! writing of the record (then the message is terminated), and
//! [`EventService::dead_letters`], which lists them.

use super::context::Ctx;
use super::envelope::{header, Envelope};
use super::lane::wait_in_lane;
use crate::service::EventService;
use crate::support::pg::{is_unavailable, Within};
use crate::support::retry::backoff;
use crate::support::sql::DEAD_LETTERS;
use crate::wire::headers;
use async_nats::jetstream::{AckKind, Message};
use const_format::formatcp;
use sqlx::postgres::PgRow;
use sqlx::Row as _;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use uuid::Uuid;

/// Records a message a group gave up on, once (see [`insert`]).
const INSERT_DEAD_LETTER: &str = formatcp!(
    "INSERT INTO {DEAD_LETTERS}
        (consumer_group, reason, error, event_id, event_name, subject, stream_sequence,
         deliveries, headers, payload, raw_headers)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11
     WHERE NOT EXISTS (SELECT 1 FROM {DEAD_LETTERS}
                       WHERE consumer_group = $1 AND stream_sequence = $7 AND reason = $2)"
);

/// A group's dead letters, oldest first.
const LIST_DEAD_LETTERS: &str = formatcp!(
    "SELECT id, consumer_group, reason, error, event_id, event_name, subject,
            stream_sequence, deliveries, payload, replayed_at, replays
     FROM {DEAD_LETTERS} WHERE consumer_group = $1 ORDER BY id LIMIT $2"
);

/// Asks for a replay of a group's dead letters not replayed yet: all, some ids, or one
/// reason (see [`Emitter::replay_dead_letters`]).
const REQUEST_REPLAY: &str = formatcp!(
    "UPDATE {DEAD_LETTERS} SET replay_requested_at = pg_catalog.now()
     WHERE consumer_group = $1 AND replayed_at IS NULL AND replay_requested_at IS NULL
       AND ($2::bigint[] IS NULL OR id = ANY($2))
       AND ($3::text IS NULL OR reason = $3)"
);

/// Deletes a group's dead letters recorded before a point in time (see
/// [`Emitter::purge_dead_letters`]).
const PURGE_DEAD_LETTERS: &str = formatcp!(
    "DELETE FROM {DEAD_LETTERS}
     WHERE consumer_group = $1
       AND created_at < pg_catalog.now() - pg_catalog.make_interval(secs => $2)"
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
    /// The handler (or the event type's `Deserialize`) panicked on every delivery, up
    /// to `max_deliveries` (`handler_panicked`).
    HandlerPanicked,
    /// JetStream delivered the message `max_redeliveries` times and never got an
    /// answer: the client could not even read it (headers no client can parse, say).
    /// Recorded from the stream, raw (`undeliverable`).
    Undeliverable,
}

impl DeadReason {
    /// Every reason, in declaration order.
    const ALL: [DeadReason; 6] = [
        DeadReason::HandlerFailed,
        DeadReason::Undecodable,
        DeadReason::UnknownEvent,
        DeadReason::UnknownVersion,
        DeadReason::HandlerPanicked,
        DeadReason::Undeliverable,
    ];

    /// The text the dead-letter table stores: `handler_failed`, `undecodable`,
    /// `unknown_event`, `unknown_version`, `handler_panicked` or `undeliverable`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::HandlerFailed => "handler_failed",
            DeadReason::Undecodable => "undecodable",
            DeadReason::UnknownEvent => "unknown_event",
            DeadReason::UnknownVersion => "unknown_version",
            DeadReason::HandlerPanicked => "handler_panicked",
            DeadReason::Undeliverable => "undeliverable",
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
#[error("unknown dead-letter reason {0:?}; this version of edupulse-events knows handler_failed, undecodable, unknown_event, unknown_version, handler_panicked and undeliverable")]
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

/// How many times a dead-letter record that Postgres refuses (not one it cannot be
/// reached for) is tried before the message is terminated without it.
const REFUSED_WRITES: u32 = 3;

/// Records a message in the dead-letter table, then terminates it. If the record
/// cannot be written, it is tried again in the lane, with backoff and progress (later
/// events of the subject wait behind it): while Postgres cannot be reached, until it
/// is written or the instance stops (the message is then handed back); when Postgres
/// refuses the record, [`REFUSED_WRITES`] times, and then the message is terminated
/// anyway, logged with what it held and counted
/// ([`ConsumerHandle::dead_letters_lost`](super::ConsumerHandle::dead_letters_lost)),
/// so that no message blocks its subject for ever.
pub(super) async fn dead_letter(
    ctx: &Ctx,
    message: &Message,
    stop: &mut watch::Receiver<bool>,
    record: DeadRecord<'_>,
) {
    let readable = headers_json(message);
    let raw = raw_headers(message);
    let (mut outages, mut refusals) = (0u32, 0u32);
    loop {
        let error = match write(ctx, message, &record, &readable, &raw).await {
            Ok(()) => {
                ctx.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
                ctx.metrics.dead_letter(record.reason.as_str());
                tracing::error!(
                    group = %ctx.group, reason = record.reason.as_str(), subject = %message.subject,
                    error = %record.why, "message moved to the dead-letter table"
                );
                terminate(message).await;
                return;
            }
            Err(error) => error,
        };
        let failures = if is_unavailable(&error) {
            outages = outages.saturating_add(1);
            outages
        } else {
            refusals = refusals.saturating_add(1);
            if refusals >= REFUSED_WRITES {
                ctx.stats.dead_letters_lost.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    %error, group = %ctx.group, reason = record.reason.as_str(),
                    subject = %message.subject, sequence = record.sequence,
                    event_id = ?record.event_id(message), why = %record.why,
                    "Postgres refuses the dead-letter record; terminating the message \
                     without it (it stays in the stream at this sequence)"
                );
                terminate(message).await;
                return;
            }
            refusals
        };
        let delay = backoff(
            ctx.settings.retry_base,
            ctx.settings.retry_max,
            i32::try_from(failures).unwrap_or(i32::MAX),
        );
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

/// Tells JetStream never to deliver the message again.
async fn terminate(message: &Message) {
    if let Err(error) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%error, "could not terminate a dead-lettered message");
    }
}

/// Text Postgres can store: a NUL (which `text` and `jsonb` refuse) becomes U+FFFD.
/// The raw bytes are kept apart (`payload`, `raw_headers`).
pub(super) fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// The header block as the consumer got it (`NATS/1.0`, then `name: value` lines),
/// every value of every header: lossless, whatever bytes the values hold.
fn raw_headers(message: &Message) -> Vec<u8> {
    let mut raw = b"NATS/1.0\r\n".to_vec();
    if let Some(headers) = &message.headers {
        for (name, values) in headers.iter() {
            for value in values {
                raw.extend_from_slice(name.to_string().as_bytes());
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(value.as_str().as_bytes());
                raw.extend_from_slice(b"\r\n");
            }
        }
    }
    raw.extend_from_slice(b"\r\n");
    raw
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
                    (
                        storable(name.as_ref()).into_owned(),
                        serde_json::Value::from(storable(value).into_owned()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::Value::Object(headers)
}

/// Writes the record once. Every text is made storable; the raw body and header
/// block are kept as bytes.
async fn write(
    ctx: &Ctx,
    message: &Message,
    record: &DeadRecord<'_>,
    readable: &serde_json::Value,
    raw: &[u8],
) -> Result<(), sqlx::Error> {
    let row = Row {
        reason: record.reason,
        why: record.why,
        event_id: record.event_id(message),
        event_name: record
            .envelope
            .map(|e| e.name.as_str())
            .or(header(message, headers::TYPE)),
        subject: message.subject.as_str(),
        sequence: record.sequence,
        deliveries: record.deliveries,
        headers: readable,
        payload: message.payload.as_ref(),
        raw_headers: raw,
    };
    insert(ctx, &row).await
}

/// One dead-letter record, as written.
pub(super) struct Row<'a> {
    pub reason: DeadReason,
    pub why: &'a str,
    pub event_id: Option<Uuid>,
    pub event_name: Option<&'a str>,
    pub subject: &'a str,
    pub sequence: u64,
    pub deliveries: u32,
    /// The headers, readable (a JSON object of storable texts).
    pub headers: &'a serde_json::Value,
    pub payload: &'a [u8],
    /// The header block as received.
    pub raw_headers: &'a [u8],
}

/// Inserts one record (texts made storable), within the statement deadline, unless
/// the group already has one of the same reason for the same stream sequence: a
/// message is recorded once, however often it comes back (its terminate lost with a
/// dropped connection) or however many paths find it (a scan and an advisory).
pub(super) async fn insert(ctx: &Ctx, row: &Row<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_DEAD_LETTER)
        .bind(storable(&ctx.group))
        .bind(row.reason.as_str())
        .bind(storable(row.why))
        .bind(row.event_id)
        .bind(row.event_name.map(storable))
        .bind(storable(row.subject))
        .bind(i64::try_from(row.sequence).unwrap_or(i64::MAX))
        .bind(i32::try_from(row.deliveries).unwrap_or(i32::MAX))
        .bind(row.headers)
        .bind(row.payload)
        .bind(row.raw_headers)
        .execute(&ctx.inner.pool)
        .within(ctx.settings.statement_timeout)
        .await?;
    Ok(())
}

/// A header block read as text, line by line (`name: value`), into a JSON object of
/// storable texts; what does not parse is kept as a name with an empty value.
pub(super) fn readable_headers(raw: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(raw);
    let headers: serde_json::Map<String, serde_json::Value> = text
        .lines()
        .skip(1)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            (
                storable(name.trim()).into_owned(),
                serde_json::Value::from(storable(value.trim()).into_owned()),
            )
        })
        .collect();
    serde_json::Value::Object(headers)
}

impl DeadRecord<'_> {
    /// The event id: the envelope's, or else the message's `ce-id` when it is a UUID
    /// (a message of an unknown type still names its event).
    fn event_id(&self, message: &Message) -> Option<Uuid> {
        self.envelope
            .map(|e| e.id)
            .or_else(|| header(message, headers::ID).and_then(|id| id.parse::<Uuid>().ok()))
    }
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
    /// When a replay went through (see
    /// [`Emitter::replay_dead_letters`](crate::Emitter::replay_dead_letters)).
    pub replayed_at: Option<time::OffsetDateTime>,
    /// How many replays were tried.
    pub replays: i32,
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
            .field("replayed_at", &self.replayed_at)
            .field("replays", &self.replays)
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
    /// [`OutboxError`](crate::OutboxError): `NotMigrated` before
    /// [`migrate`](EventService::migrate), else the Postgres error.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, crate::OutboxError> {
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
                    replayed_at: row.try_get("replayed_at")?,
                    replays: row.try_get("replays")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

/// Which dead letters of a group to replay (see
/// [`Emitter::replay_dead_letters`](crate::Emitter::replay_dead_letters)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replay {
    /// Every letter of the group not replayed yet.
    All,
    /// These letters (by [`DeadLetter::id`]).
    Ids(Vec<i64>),
    /// Every letter of the group with this reason.
    Reason(DeadReason),
}

impl EventService {
    /// Asks for the replay of dead letters of `group`: see
    /// [`Emitter::replay_dead_letters`](crate::Emitter::replay_dead_letters).
    ///
    /// # Errors
    /// [`OutboxError`](crate::OutboxError): `NotMigrated` before
    /// [`migrate`](EventService::migrate), else the Postgres error.
    pub async fn replay_dead_letters(
        &self,
        group: &str,
        which: Replay,
    ) -> Result<u64, crate::OutboxError> {
        self.emitter().replay_dead_letters(group, which).await
    }

    /// Deletes the dead letters of `group` recorded more than `older_than` ago: see
    /// [`Emitter::purge_dead_letters`](crate::Emitter::purge_dead_letters).
    ///
    /// # Errors
    /// [`OutboxError`](crate::OutboxError): `NotMigrated` before
    /// [`migrate`](EventService::migrate), else the Postgres error.
    pub async fn purge_dead_letters(
        &self,
        group: &str,
        older_than: std::time::Duration,
    ) -> Result<u64, crate::OutboxError> {
        self.emitter().purge_dead_letters(group, older_than).await
    }
}

impl crate::Emitter {
    /// Asks for the replay of dead letters of `group`; returns how many were asked
    /// for. A running instance of the group (within about a second) hands each
    /// recorded message to its handler again, to that group alone, in stream order, as
    /// it handles any event (an `on_tx` handler's inbox still applies it once). One
    /// that goes through is marked replayed ([`DeadLetter::replayed_at`]); one that
    /// fails again stays a dead letter, with the new error and one more
    /// [`DeadLetter::replays`], and may be asked for again. Letters already replayed,
    /// or waiting for one, are left alone. Deploy the fix first.
    ///
    /// # Errors
    /// [`OutboxError`](crate::OutboxError): `NotMigrated` before
    /// [`migrate`](crate::Emitter::migrate), else the Postgres error.
    pub async fn replay_dead_letters(
        &self,
        group: &str,
        which: Replay,
    ) -> Result<u64, crate::OutboxError> {
        let (ids, reason) = match which {
            Replay::All => (None, None),
            Replay::Ids(ids) => (Some(ids), None),
            Replay::Reason(reason) => (None, Some(reason.as_str())),
        };
        let result = sqlx::query(REQUEST_REPLAY)
            .bind(group)
            .bind(ids)
            .bind(reason)
            .execute(&self.inner.pool)
            .await?;
        Ok(result.rows_affected())
    }

    /// Deletes the dead letters of `group` recorded more than `older_than` ago;
    /// returns how many. Needs Postgres only (the `edupulse dead-letters purge`
    /// command uses it); the messages themselves stay in the stream until its limits
    /// remove them.
    ///
    /// # Errors
    /// [`OutboxError`](crate::OutboxError): `NotMigrated` before
    /// [`migrate`](crate::Emitter::migrate), else the Postgres error.
    pub async fn purge_dead_letters(
        &self,
        group: &str,
        older_than: std::time::Duration,
    ) -> Result<u64, crate::OutboxError> {
        let result = sqlx::query(PURGE_DEAD_LETTERS)
            .bind(group)
            .bind(older_than.as_secs_f64())
            .execute(&self.inner.pool)
            .await?;
        Ok(result.rows_affected())
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
            replayed_at: None,
            replays: 0,
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
