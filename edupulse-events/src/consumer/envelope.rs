//! What a handler receives ([`Received`], [`Envelope`]) and returns on failure
//! ([`HandlerError`]), and the reading of a message's headers into an envelope, or
//! into the reason it cannot be handled.

use super::dead_letter::DeadReason;
use super::route::{Route, Routes};
use crate::wire::headers;
use async_nats::jetstream::Message;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// What a handler returns on failure: any error; it is logged, the event retried, and
/// after the last delivery recorded in the dead-letter table with this message.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// An event as a handler receives it: the typed event and its envelope.
#[derive(Debug, Clone)]
pub struct Received<E> {
    /// The event.
    pub event: E,
    /// Where it came from and how it travelled.
    pub envelope: Envelope,
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
    let Some(route) = routes.get(name) else {
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
    if version != route.version {
        return Err((
            DeadReason::UnknownVersion,
            format!(
                "event `{name}` has version {version}; this consumer handles version {}",
                route.version
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
        source: header(message, headers::SOURCE).unwrap_or("").to_owned(),
        time,
        subject: message.subject.as_str().to_owned(),
        correlation_id: uuid_header(headers::CORRELATION_ID),
        causation_id: uuid_header(headers::CAUSATION_ID),
        attempt: delivered.count,
        stream_sequence: delivered.sequence,
    })
}
