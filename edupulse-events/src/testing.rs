//! Testing handlers without NATS (feature `testing`; enable it in `[dev-dependencies]`
//! only).
//!
//! - [`received_via`] builds the [`Received<E>`] a handler gets, whose
//!   [`emit_in`](Received::emit_in) writes through the [`Emitter`] you give (Postgres
//!   only), with a plausible [`Envelope`] you may change (its fields are public);
//!   [`received`] builds one with no emitter.
//! - [`capture`] runs a future (a handler, a web handler that emits) and hands back,
//!   with its result, every event it emitted, as [`Emitted`]: typed events, without
//!   reading the outbox's tables.
//! - [`handle`] does the same as the consumer runs a handler: events emitted through
//!   an emitter of the handler's own are caused by the received event too.
//!
//! Emitting still writes to Postgres (use a test database, migrated, and roll the
//! transaction back if you like); no NATS is needed.
//!
//! ```no_run
//! use edupulse_events::{testing, DomainEvent, Emitter, HandlerError, Received};
//! use edupulse_events::sqlx::PgConnection;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, DomainEvent)]
//! #[event(name = "quiz.submitted")]
//! struct QuizSubmitted { quiz_id: i64, answers: Vec<u8> }
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
//! #[event(name = "quiz.graded")]
//! struct QuizGraded { quiz_id: i64, score: u32 }
//!
//! async fn grade(tx: &mut PgConnection, received: Received<QuizSubmitted>) -> Result<(), HandlerError> {
//!     let score = received.event.answers.iter().filter(|a| **a == 1).count() as u32;
//!     received.emit_in(tx, QuizGraded { quiz_id: received.event.quiz_id, score }).await?;
//!     Ok(())
//! }
//!
//! # async fn test(emitter: Emitter) -> Result<(), Box<dyn std::error::Error>> {
//! let received = testing::received_via(&emitter, QuizSubmitted { quiz_id: 7, answers: vec![1, 0, 1] });
//! let cause = received.envelope.clone();
//! let mut tx = emitter.pool().begin().await?;
//! let (result, emitted) = testing::capture(grade(&mut tx, received)).await;
//! result.expect("the handler succeeds");
//! assert_eq!(emitted.of::<QuizGraded>()?, vec![QuizGraded { quiz_id: 7, score: 2 }]);
//! assert_eq!(emitted.all()[0].causation_id, Some(cause.id));
//! tx.rollback().await?;
//! # Ok(()) }
//! ```

use crate::causation::Cause;
use crate::consumer::{Envelope, Received, Via};
use crate::DomainEvent;
use crate::Emitter;
use std::cell::RefCell;
use std::future::Future;
use time::OffsetDateTime;
use uuid::Uuid;

/// The envelope [`received`] gives an event: a new v7 id, the type's name and version,
/// source `test`, the time now, the subject under the default prefix, no correlation
/// or causation id, first delivery, stream sequence 1. Change any field after.
pub fn envelope<E: DomainEvent>(event: &E) -> Envelope {
    let subject = event
        .subject()
        .map(|s| format!("{}.{s}", crate::DEFAULT_SUBJECT_PREFIX))
        .unwrap_or_else(|_| format!("{}.{}", crate::DEFAULT_SUBJECT_PREFIX, E::NAME));
    Envelope {
        id: Uuid::now_v7(),
        name: E::NAME.to_owned(),
        version: E::VERSION,
        source: "test".to_owned(),
        time: OffsetDateTime::now_utc(),
        subject,
        correlation_id: None,
        causation_id: None,
        attempt: 1,
        stream_sequence: 1,
        via: Via::default(),
    }
}

/// A [`Received<E>`] as a handler gets it, with the [`envelope`] for `event`.
pub fn received<E: DomainEvent>(event: E) -> Received<E> {
    let envelope = envelope(&event);
    Received { event, envelope }
}

/// A [`Received<E>`] as [`received`] builds it, whose
/// [`emit_in`](Received::emit_in) and [`emit`](Received::emit) write through
/// `emitter`, as a delivered event's do through the consumer's service.
pub fn received_via<E: DomainEvent>(emitter: &Emitter, event: E) -> Received<E> {
    let mut envelope = envelope(&event);
    envelope.via = Via(Some(emitter.clone()));
    Received { event, envelope }
}

/// A [`Received<E>`] with the envelope you give.
pub fn received_with<E: DomainEvent>(event: E, envelope: Envelope) -> Received<E> {
    Received { event, envelope }
}

/// One event written to the outbox while [`capture`] or [`handle`] ran.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EmittedEvent {
    /// The event id.
    pub id: Uuid,
    /// The event name.
    pub name: &'static str,
    /// The schema version.
    pub version: u32,
    /// The relative subject (without the prefix).
    pub subject: String,
    /// The JSON body.
    pub payload: serde_json::Value,
    /// The conversation it joins.
    pub correlation_id: Uuid,
    /// The event that caused it.
    pub causation_id: Option<Uuid>,
}

impl EmittedEvent {
    /// The event as type `E`, if it is one (same name).
    ///
    /// # Errors
    /// The JSON error if the body does not decode as `E`.
    pub fn decode<E: DomainEvent>(&self) -> Result<Option<E>, serde_json::Error> {
        if self.name != E::NAME {
            return Ok(None);
        }
        serde_json::from_value(self.payload.clone()).map(Some)
    }
}

/// The events written to the outbox while [`capture`] or [`handle`] ran, in order.
///
/// They were written (the insert succeeded); whether their transaction committed is up
/// to the code under test.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Emitted {
    events: Vec<EmittedEvent>,
}

impl Emitted {
    /// Every emitted event, in order.
    pub fn all(&self) -> &[EmittedEvent] {
        &self.events
    }

    /// The emitted events of type `E`, decoded, in order.
    ///
    /// # Errors
    /// The JSON error if one does not decode as `E`.
    pub fn of<E: DomainEvent>(&self) -> Result<Vec<E>, serde_json::Error> {
        self.events
            .iter()
            .filter_map(|event| event.decode::<E>().transpose())
            .collect()
    }

    /// The names of the emitted events, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.events.iter().map(|event| event.name).collect()
    }

    /// How many events were emitted.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

tokio::task_local! {
    static CAPTURED: RefCell<Vec<EmittedEvent>>;
}

/// Runs `work` and returns its output with every event it emitted (on this task:
/// events emitted by tasks it spawns are not seen).
pub async fn capture<T>(work: impl Future<Output = T>) -> (T, Emitted) {
    CAPTURED
        .scope(RefCell::new(Vec::new()), async move {
            let output = work.await;
            let events = CAPTURED.with(|captured| captured.take());
            (output, Emitted { events })
        })
        .await
}

/// Runs `work` as the consumer runs a handler of the event with envelope `cause`: the
/// events it emits carry `cause.id` as causation id and its correlation id (or its id
/// when it has none); returns its output with every event it emitted.
pub async fn handle<T>(cause: &Envelope, work: impl Future<Output = T>) -> (T, Emitted) {
    let cause = Cause::of(cause.id, cause.correlation_id);
    capture(cause.scope(work)).await
}

/// Records an event just written, when a capture is running on this task.
pub(crate) fn record(event: impl FnOnce() -> EmittedEvent) {
    let _ = CAPTURED.try_with(|captured| captured.borrow_mut().push(event()));
}
