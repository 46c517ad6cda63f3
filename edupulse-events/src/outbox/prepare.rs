//! Checking and encoding an event before it is written: its subject, its JSON body
//! (no NUL, which JSONB refuses), its traceparent, and its size against what NATS and
//! the stream accept.

use super::sql::JSONB_SIZES;
use super::{EmitError, Emitter, Outgoing};
use crate::subject::{check_name, check_subject};
use crate::wire::{valid_traceparent, Outbound};
use crate::DomainEvent;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

/// One event, checked and encoded, ready to insert.
pub(super) struct Prepared {
    pub id: Uuid,
    pub subject: String,
    pub payload: String,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
    pub occurred_at: OffsetDateTime,
    /// The room left for the JSON body, as Postgres will print it, after the headers.
    pub body_limit: i64,
    /// Whether the insert must check the printed size: `None` when it cannot exceed
    /// `body_limit` (see [`printed_fits`]), which spares Postgres printing the JSONB.
    pub check_limit: Option<i64>,
}

#[cfg(feature = "testing")]
impl Prepared {
    /// Tells a running [`crate::testing::capture`] that this event was written.
    pub(super) fn record<E: DomainEvent>(&self) {
        crate::testing::record(|| crate::testing::EmittedEvent {
            id: self.id,
            name: E::NAME,
            version: E::VERSION,
            subject: self.subject.clone(),
            payload: serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
        });
    }
}

/// Whether compact JSON, as Postgres prints it as JSONB, surely fits in `limit` bytes.
/// Printing adds at most a space after each `,` and `:` (so at most doubles the text),
/// re-escapes strings to at most the same length, and writes numbers in full: only a
/// number with an exponent (`1e300`) can grow beyond that, so one makes the answer no.
fn printed_fits(json: &str, limit: usize) -> bool {
    if json.len().saturating_mul(2) > limit {
        return false;
    }
    let (mut in_string, mut escaped, mut previous) = (false, false, b' ');
    for &byte in json.as_bytes() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if (byte == b'e' || byte == b'E') && (previous.is_ascii_digit() || previous == b'.')
        {
            return false;
        }
        previous = byte;
    }
    true
}

/// The longest full subject (prefix, `.`, subject) an event may have. NATS reads a
/// command line of at most 4 KiB (`HPUB {subject} {reply inbox} {sizes}`): this leaves
/// room for the rest.
pub(crate) const MAX_SUBJECT_LEN: usize = 3_840;

/// Checks what the type says of itself: its name by the derive's rule, and the subject
/// it made token by token. A derived type always passes; a hand-written impl may not,
/// and what it would publish is refused here rather than retried by the relay for
/// ever.
fn check_definition<E: DomainEvent>(subject: &str) -> Result<(), EmitError> {
    let invalid = |reason: String| EmitError::Definition {
        event: E::NAME,
        reason,
    };
    check_name(E::NAME).map_err(|problem| invalid(format!("its name {:?}: {problem}", E::NAME)))?;
    check_subject(subject).map_err(|(token, problem)| {
        invalid(format!(
            "its subject {:?} has token {token:?}: {problem}",
            subject.chars().take(128).collect::<String>()
        ))
    })
}

impl Emitter {
    pub(super) fn prepare<E: DomainEvent>(
        &self,
        outgoing: Outgoing<E>,
    ) -> Result<Prepared, EmitError> {
        let subject = outgoing.event.subject()?;
        check_definition::<E>(&subject)?;
        let full = self.inner.config.subject_prefix.len() + 1 + subject.len();
        if full > MAX_SUBJECT_LEN {
            return Err(EmitError::SubjectTooLong {
                event: E::NAME,
                len: full,
                max: MAX_SUBJECT_LEN,
            });
        }
        let payload =
            serde_json::to_string(&outgoing.event).map_err(|source| EmitError::Encode {
                event: E::NAME,
                source,
            })?;
        if has_escaped_nul(&payload) {
            return Err(EmitError::Encode {
                event: E::NAME,
                source: serde::ser::Error::custom(
                    "a string contains a NUL character (\\u0000), which Postgres JSONB cannot store; remove it",
                ),
            });
        }
        if let Some(traceparent) = &outgoing.traceparent {
            if !valid_traceparent(traceparent) {
                return Err(EmitError::Traceparent(
                    traceparent.chars().take(80).collect(),
                ));
            }
        }
        let id = Uuid::now_v7();
        let occurred_at = OffsetDateTime::now_utc();
        // Inside a consumer's handler, a new event is caused by the one being handled
        // and joins its conversation, unless the caller said otherwise.
        let cause = crate::causation::current();
        let causation_id = outgoing.causation_id.or(cause.map(|c| c.event_id));
        let correlation_id = outgoing
            .correlation_id
            .or(cause.map(|c| c.correlation_id))
            .unwrap_or(id);
        let envelope = Outbound {
            id,
            name: E::NAME,
            version: version_i32::<E>(),
            subject: &subject,
            source: &self.inner.config.source,
            occurred_at,
            correlation_id: Some(correlation_id),
            causation_id,
            traceparent: outgoing.traceparent.as_deref(),
        };
        let headers = envelope.headers_wire_len();
        let max = self.inner.max_message;
        if headers + payload.len() > max {
            return Err(EmitError::TooLarge {
                event: E::NAME,
                size: headers + payload.len(),
                max,
            });
        }
        let body_limit = i64::try_from(max - headers).unwrap_or(i64::MAX);
        Ok(Prepared {
            check_limit: (!printed_fits(&payload, max - headers)).then_some(body_limit),
            id,
            subject,
            payload,
            correlation_id,
            causation_id,
            traceparent: outgoing
                .traceparent
                .or_else(crate::telemetry::current_traceparent),
            occurred_at,
            body_limit,
        })
    }

    /// The error for the first of `candidates` whose JSON body, as Postgres prints
    /// JSONB, does not fit beside its headers (the insert's size check refused it).
    pub(super) async fn too_large<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        candidates: &[&Prepared],
    ) -> EmitError {
        let max = self.inner.max_message;
        let sizes: Result<Vec<i64>, sqlx::Error> = sqlx::query_scalar(JSONB_SIZES)
            .bind(
                candidates
                    .iter()
                    .map(|p| p.payload.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *conn)
            .await;
        let headers = |p: &Prepared| max.saturating_sub(usize::try_from(p.body_limit).unwrap_or(0));
        let found = sizes.ok().and_then(|sizes| {
            candidates
                .iter()
                .zip(sizes)
                .find(|(p, size)| *size > p.body_limit)
                .map(|(p, size)| headers(p) + usize::try_from(size).unwrap_or(usize::MAX))
        });
        let size = found.unwrap_or_else(|| {
            // Could not ask: the largest compact body, plus at least the one byte
            // Postgres' printing adds (spaces after `:` and `,`).
            candidates
                .iter()
                .map(|p| headers(p) + p.payload.len())
                .max()
                .unwrap_or(0)
                .max(max + 1)
        });
        EmitError::TooLarge {
            event: E::NAME,
            size,
            max,
        }
    }
}

/// Whether compact JSON holds an escaped NUL (`\u0000` not itself escaped).
fn has_escaped_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    json.match_indices("\\u0000").any(|(at, _)| {
        let backslashes = bytes[..at]
            .iter()
            .rev()
            .take_while(|b| **b == b'\\')
            .count();
        backslashes % 2 == 0
    })
}

pub(super) fn version_i32<E: DomainEvent>() -> i32 {
    // The derive refuses versions above i32::MAX; only a hand-written impl gets here.
    i32::try_from(E::VERSION).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::{has_escaped_nul, printed_fits};

    #[test]
    fn printed_size_is_checked_only_where_it_could_exceed_the_limit() {
        // Plain JSON well under half the limit fits whatever Postgres' spacing.
        assert!(printed_fits(
            r#"{"title":"true false e1 2e3","n":[1,2.5,-3]}"#,
            1000
        ));
        assert!(printed_fits(
            r#"{"s":"a\"1e9\"b","t":true,"f":false}"#,
            1000
        ));
        // Over half the limit: spaces after `,` and `:` could push it over.
        assert!(!printed_fits(&"[1,".repeat(200), 1000));
        // A number with an exponent prints in full: 1e300 is 301 digits.
        assert!(!printed_fits(r#"{"x":1e300}"#, 1000));
        assert!(!printed_fits(r#"[1.5E-7]"#, 1000));
        assert!(!printed_fits(
            &serde_json::to_string(&1e300_f64).unwrap(),
            1000
        ));
    }

    #[test]
    fn escaped_nul_is_found_and_escaped_backslashes_are_not() {
        assert!(has_escaped_nul(&serde_json::to_string("a\u{0}b").unwrap()));
        assert!(!has_escaped_nul(
            &serde_json::to_string("a\\u0000b").unwrap()
        ));
        assert!(has_escaped_nul(&serde_json::to_string("\\\u{0}").unwrap()));
        assert!(!has_escaped_nul(r#"{"a":"plain"}"#));
    }
}
