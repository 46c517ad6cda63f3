//! What a handler receives ([`Received`], [`Envelope`]) and returns on failure
//! ([`HandlerError`]), and the reading of a message's headers into an envelope, or
//! into the reason it cannot be handled.

use super::dead_letter::DeadReason;
use super::route::{Route, Routes};
use crate::outbox::{EmitError, Emitter, Outgoing};
use crate::wire::{decode_value, headers};
use crate::DomainEvent;
use async_nats::jetstream::Message;
use sqlx::PgConnection;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// What a handler returns on failure: any error; it is logged, the event retried, and
/// after the last delivery recorded in the dead-letter table with this message.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// An event as a handler receives it: the typed event and its envelope.
///
/// It is also the handler's way to emit: [`Received::emit_in`] writes an event in the
/// handler's transaction, caused by this one (see [`Received::emit_in`]).
#[derive(Debug, Clone)]
pub struct Received<E> {
    /// The event.
    pub event: E,
    /// Where it came from and how it travelled.
    pub envelope: Envelope,
}

impl<E> Received<E> {
    /// Emits `event` inside `tx` (an `on_tx` handler's transaction: it is published if
    /// and only if the handler's effects commit), through the consumer's service. It
    /// carries this event's id as causation id and its correlation id (or its id),
    /// unless `Outgoing` sets them.
    ///
    /// ```no_run
    /// # use edupulse_events::{DomainEvent, EventService, HandlerError, Received};
    /// # use edupulse_events::sqlx::PgConnection;
    /// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
    /// # #[event(name = "quiz.submitted")]
    /// # struct QuizSubmitted { quiz_id: i64 }
    /// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
    /// # #[event(name = "quiz.graded")]
    /// # struct QuizGraded { quiz_id: i64, score: u32 }
    /// async fn grade(tx: &mut PgConnection, received: Received<QuizSubmitted>) -> Result<(), HandlerError> {
    ///     let quiz_id = received.event.quiz_id;
    ///     sqlx::query("INSERT INTO grades (quiz_id, score) VALUES ($1, 3)")
    ///         .bind(quiz_id)
    ///         .execute(&mut *tx)
    ///         .await?;
    ///     received.emit_in(tx, QuizGraded { quiz_id, score: 3 }).await?;
    ///     Ok(())
    /// }
    /// # async fn run(service: EventService) -> Result<(), Box<dyn std::error::Error>> {
    /// let grading = service.consumer("grading").on_tx_fn(grade).start().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`EmitError`]; [`EmitError::Unbound`] when this `Received` was not delivered by
    /// a consumer (built by hand, or by `testing::received` without an emitter).
    pub async fn emit_in<F: DomainEvent>(
        &self,
        tx: &mut PgConnection,
        event: impl Into<Outgoing<F>>,
    ) -> Result<Uuid, EmitError> {
        let emitter = self.envelope.via.emitter()?;
        emitter.emit_in(tx, self.caused(event.into())).await
    }

    /// Emits `event` in a transaction of its own (for a plain `on` handler), caused by
    /// this event, as [`Received::emit_in`] does.
    ///
    /// # Errors
    /// As [`Received::emit_in`].
    pub async fn emit<F: DomainEvent>(
        &self,
        event: impl Into<Outgoing<F>>,
    ) -> Result<Uuid, EmitError> {
        let emitter = self.envelope.via.emitter()?;
        emitter.emit(self.caused(event.into())).await
    }

    /// `outgoing`, caused by this event unless it says otherwise.
    fn caused<F: DomainEvent>(&self, mut outgoing: Outgoing<F>) -> Outgoing<F> {
        let envelope = &self.envelope;
        outgoing.causation_id.get_or_insert(envelope.id);
        outgoing
            .correlation_id
            .get_or_insert(envelope.correlation_id.unwrap_or(envelope.id));
        outgoing
    }
}

/// The emitter a delivered event's handler emits through; none when the envelope was
/// built by hand. Not part of the envelope's value: two envelopes that differ only
/// here are equal.
#[derive(Clone, Default)]
pub(crate) struct Via(pub Option<Emitter>);

impl Via {
    fn emitter(&self) -> Result<&Emitter, EmitError> {
        self.0.as_ref().ok_or(EmitError::Unbound)
    }
}

impl PartialEq for Via {
    fn eq(&self, _: &Via) -> bool {
        true
    }
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "bound" } else { "unbound" })
    }
}

/// An event's metadata, read from the message's CloudEvents headers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// The event id.
    pub id: Uuid,
    /// The event name.
    pub name: String,
    /// The schema version.
    pub version: u32,
    /// The emitting service.
    pub source: String,
    /// When the event occurred.
    pub time: OffsetDateTime,
    /// The full NATS subject.
    pub subject: String,
    /// The conversation the event belongs to.
    pub correlation_id: Option<Uuid>,
    /// The event that caused it.
    pub causation_id: Option<Uuid>,
    /// Which delivery this is, from 1.
    pub attempt: u32,
    /// The message's sequence number in the stream.
    pub stream_sequence: u64,
    /// The emitter [`Received::emit_in`] uses.
    pub(crate) via: Via,
}

/// What a message is to a group.
pub(super) enum Parsed<'a> {
    /// Not this group's (servers before 2.10 deliver the whole prefix).
    NotOurs,
    /// One of this group's subjects, but it cannot be handled: why, and what went wrong.
    Dead(DeadReason, String),
    /// An event for this route.
    Event(&'a Route, Envelope),
}

/// The first value of the header `name`.
pub(super) fn header<'m>(message: &'m async_nats::Message, name: &str) -> Option<&'m str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// Where a message is delivered: which delivery this is and its stream sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delivered {
    /// Which delivery this is, from 1.
    pub count: u32,
    /// The message's stream sequence number.
    pub sequence: u64,
}

impl Delivered {
    /// Reads them from the message's reply subject; a message without one is taken as
    /// a first delivery at sequence 0.
    pub fn of(message: &Message) -> Delivered {
        match message.info() {
            Ok(info) => Delivered {
                count: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                sequence: info.stream_sequence,
            },
            Err(_) => Delivered {
                count: 1,
                sequence: 0,
            },
        }
    }
}

/// Reads what a message is to `group`, whose subjects start with `prefix`.
pub(super) fn parse<'r>(
    routes: &'r Routes,
    group: &str,
    prefix: &str,
    message: &async_nats::Message,
    delivered: Delivered,
) -> Parsed<'r> {
    let subject = message.subject.as_str();
    let relative = subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(subject);
    if !routes.covers(relative) {
        return Parsed::NotOurs;
    }
    let Some(name) = header(message, headers::TYPE) else {
        return Parsed::Dead(
            DeadReason::Undecodable,
            "the message has no ce-type header".to_owned(),
        );
    };
    let name = decode_value(name);
    let Some(route) = routes.get(&name) else {
        return Parsed::Dead(
            DeadReason::UnknownEvent,
            format!("no handler in group `{group}` for event `{name}` on subject {subject}"),
        );
    };
    match envelope_of(message, route, delivered) {
        Ok(envelope) => Parsed::Event(route, envelope),
        Err((reason, why)) => Parsed::Dead(reason, why),
    }
}

/// The envelope of a message for `route`, or why it has none.
fn envelope_of(
    message: &async_nats::Message,
    route: &Route,
    delivered: Delivered,
) -> Result<Envelope, (DeadReason, String)> {
    let name = route.name;
    let Some(id) = header(message, headers::ID).and_then(|v| v.parse::<Uuid>().ok()) else {
        return Err((
            DeadReason::Undecodable,
            "the message has no valid ce-id header (a UUID)".to_owned(),
        ));
    };
    let version = match header(message, headers::VERSION).map(str::parse::<u32>) {
        None => 1,
        Some(Ok(version)) => version,
        Some(Err(_)) => {
            return Err((
                DeadReason::Undecodable,
                "the ce-eventversion header is not a number".to_owned(),
            ))
        }
    };
    if !route.accepts(version) {
        let handled = if route.oldest_version == route.version {
            format!("version {}", route.version)
        } else {
            format!(
                "versions {} to {} (converted through `previous` into version {})",
                route.oldest_version, route.version, route.version
            )
        };
        return Err((
            DeadReason::UnknownVersion,
            format!(
                "event `{name}` has version {version}; this consumer handles {handled}: \
                 handle a type of that version, or link it into the chain with `previous`"
            ),
        ));
    }
    let time = header(message, headers::TIME)
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .unwrap_or_else(OffsetDateTime::now_utc);
    let uuid_header = |name| header(message, name).and_then(|v| v.parse::<Uuid>().ok());
    Ok(Envelope {
        id,
        name: name.to_owned(),
        version,
        source: header(message, headers::SOURCE)
            .map(|source| decode_value(source).into_owned())
            .unwrap_or_default(),
        time,
        subject: message.subject.as_str().to_owned(),
        correlation_id: uuid_header(headers::CORRELATION_ID),
        causation_id: uuid_header(headers::CAUSATION_ID),
        attempt: delivered.count,
        stream_sequence: delivered.sequence,
        via: Via::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::route::tests::route;

    const PREFIX: &str = "edupulse";
    const DELIVERED: Delivered = Delivered {
        count: 3,
        sequence: 42,
    };

    fn routes() -> Routes {
        Routes::new(
            "grading",
            vec![
                route("quiz.submitted", 2, "quiz.*.submitted"),
                route("lesson.published", 1, "lesson.published"),
            ],
        )
        .unwrap()
    }

    fn message(subject: &str, headers: &[(&str, &str)]) -> async_nats::Message {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: bytes::Bytes::new(),
            headers: (!headers.is_empty()).then_some(map),
            status: None,
            description: None,
            length: 0,
        }
    }

    /// The reason and text of a message the group cannot handle; panics otherwise.
    fn dead(message: &async_nats::Message) -> (DeadReason, String) {
        match parse(&routes(), "grading", PREFIX, message, DELIVERED) {
            Parsed::Dead(reason, why) => (reason, why),
            Parsed::NotOurs => panic!("not ours"),
            Parsed::Event(route, _) => panic!("an event for {}", route.name),
        }
    }

    #[test]
    fn a_full_message_gives_its_route_and_envelope() {
        let id = Uuid::now_v7();
        let correlation = Uuid::now_v7();
        let id_text = id.to_string();
        let correlation_text = correlation.to_string();
        let message = message(
            "edupulse.quiz.q7.submitted",
            &[
                (headers::TYPE, "quiz.submitted"),
                (headers::ID, &id_text),
                (headers::VERSION, "2"),
                (headers::SOURCE, "quizzes"),
                (headers::TIME, "2026-01-02T03:04:05Z"),
                (headers::CORRELATION_ID, &correlation_text),
                (headers::CAUSATION_ID, "not a uuid"),
            ],
        );
        let routes = routes();
        let Parsed::Event(route, envelope) = parse(&routes, "grading", PREFIX, &message, DELIVERED)
        else {
            panic!("not an event");
        };
        assert_eq!(route.name, "quiz.submitted");
        assert_eq!(envelope.id, id);
        assert_eq!(envelope.name, "quiz.submitted");
        assert_eq!(envelope.version, 2);
        assert_eq!(envelope.source, "quizzes");
        assert_eq!(
            envelope.time,
            OffsetDateTime::parse("2026-01-02T03:04:05Z", &Rfc3339).unwrap()
        );
        assert_eq!(envelope.subject, "edupulse.quiz.q7.submitted");
        assert_eq!(envelope.correlation_id, Some(correlation));
        assert_eq!(envelope.causation_id, None);
        assert_eq!(envelope.attempt, 3);
        assert_eq!(envelope.stream_sequence, 42);
    }

    #[test]
    fn a_missing_version_header_means_version_1() {
        let id = Uuid::now_v7().to_string();
        let message = message(
            "edupulse.lesson.published",
            &[(headers::TYPE, "lesson.published"), (headers::ID, &id)],
        );
        let routes = routes();
        let Parsed::Event(_, envelope) = parse(&routes, "grading", PREFIX, &message, DELIVERED)
        else {
            panic!("not an event");
        };
        assert_eq!(envelope.version, 1);
        assert_eq!(envelope.source, "");
    }

    #[test]
    fn a_subject_outside_the_filters_is_not_ours() {
        for subject in ["edupulse.lesson.deleted", "other.lesson.published"] {
            let message = message(subject, &[(headers::TYPE, "lesson.published")]);
            assert!(matches!(
                parse(&routes(), "grading", PREFIX, &message, DELIVERED),
                Parsed::NotOurs
            ));
        }
    }

    #[test]
    fn each_flaw_has_its_dead_reason() {
        let id = Uuid::now_v7().to_string();
        let subject = "edupulse.lesson.published";
        let (reason, why) = dead(&message(subject, &[]));
        assert_eq!(reason, DeadReason::Undecodable);
        assert!(why.contains("ce-type"), "{why}");

        let (reason, why) = dead(&message(subject, &[(headers::TYPE, "lesson.deleted")]));
        assert_eq!(reason, DeadReason::UnknownEvent);
        assert!(
            why.contains("`grading`") && why.contains("`lesson.deleted`"),
            "{why}"
        );

        let (reason, why) = dead(&message(
            subject,
            &[(headers::TYPE, "lesson.published"), (headers::ID, "seven")],
        ));
        assert_eq!(reason, DeadReason::Undecodable);
        assert!(why.contains("ce-id"), "{why}");

        let (reason, why) = dead(&message(
            subject,
            &[
                (headers::TYPE, "lesson.published"),
                (headers::ID, &id),
                (headers::VERSION, "two"),
            ],
        ));
        assert_eq!(reason, DeadReason::Undecodable);
        assert!(why.contains("ce-eventversion"), "{why}");

        let (reason, why) = dead(&message(
            subject,
            &[
                (headers::TYPE, "lesson.published"),
                (headers::ID, &id),
                (headers::VERSION, "99"),
            ],
        ));
        assert_eq!(reason, DeadReason::UnknownVersion);
        assert!(
            why.contains("version 99") && why.contains("version 1"),
            "{why}"
        );
    }

    #[test]
    fn every_version_with_a_path_to_the_route_is_accepted() {
        let mut chained = route("quiz.submitted", 3, "quiz.*.submitted");
        chained.oldest_version = 1;
        let routes = Routes::new("grading", vec![chained]).unwrap();
        let id = Uuid::now_v7().to_string();
        let parse_version = |version: &str| {
            let message = message(
                "edupulse.quiz.q1.submitted",
                &[
                    (headers::TYPE, "quiz.submitted"),
                    (headers::ID, &id),
                    (headers::VERSION, version),
                ],
            );
            match parse(&routes, "grading", PREFIX, &message, DELIVERED) {
                Parsed::Event(_, envelope) => Ok(envelope.version),
                Parsed::Dead(reason, why) => Err((reason, why)),
                Parsed::NotOurs => panic!("not ours"),
            }
        };
        for version in [1, 2, 3] {
            assert_eq!(parse_version(&version.to_string()), Ok(version));
        }
        for version in ["0", "4"] {
            let (reason, why) = parse_version(version).unwrap_err();
            assert_eq!(reason, DeadReason::UnknownVersion);
            assert!(
                why.contains(&format!("version {version};"))
                    && why
                        .contains("versions 1 to 3 (converted through `previous` into version 3)"),
                "{why}"
            );
        }
    }
}
