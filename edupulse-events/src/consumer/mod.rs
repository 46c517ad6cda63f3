//! Consuming events: typed handlers on a durable JetStream pull consumer, with an
//! inbox that makes `on_tx` handlers apply each event's effects once.
//!
//! ```no_run
//! # use edupulse_events::{DomainEvent, EventService, Received};
//! # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
//! # #[event(name = "quiz.submitted")]
//! # struct QuizSubmitted { quiz_id: i64, score: f32 }
//! # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
//! # #[event(name = "lesson.published")]
//! # struct LessonPublished { lesson_id: i64 }
//! # async fn run(service: EventService) -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = service
//!     .consumer("grading")
//!     .on::<QuizSubmitted, _, _>(|received: Received<QuizSubmitted>| async move {
//!         println!("quiz {} scored {}", received.event.quiz_id, received.event.score);
//!         Ok(())
//!     })
//!     .on_tx::<LessonPublished, _>(|tx, received| {
//!         Box::pin(async move {
//!             sqlx::query("INSERT INTO lesson_index (id) VALUES ($1)")
//!                 .bind(received.event.lesson_id)
//!                 .execute(&mut *tx)
//!                 .await?;
//!             Ok(())
//!         })
//!     })
//!     .start()
//!     .await?;
//! consumer.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The parts, one per file: [`settings`] (what a group may be told), [`builder`]
//! (registering handlers and starting), [`route`] (which handler an event goes to),
//! [`envelope`] (what a handler receives), [`fetch`] (the pull loop), [`gate`] (the
//! order across a dead instance), [`lane`] (handling, retrying, acking), [`inbox`]
//! (exactly-once effects), [`dead_letter`] (what a group gives up on) and [`context`]
//! (what the loop and the lanes share).

mod builder;
mod context;
mod dead_letter;
mod envelope;
mod fetch;
mod gate;
mod inbox;
mod lane;
mod route;
mod settings;

pub use builder::ConsumerBuilder;
pub use dead_letter::{DeadLetter, DeadReason, ParseDeadReasonError};
pub use envelope::{Envelope, HandlerError, Received};
pub use settings::{ConsumerSettings, StartFrom};

use context::Stats;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What kind of failure a [`ConsumerError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerErrorKind {
    /// The group name cannot be a JetStream durable name.
    InvalidGroup,
    /// No handler was registered.
    NoHandlers,
    /// Two handlers were registered for one event type.
    DuplicateHandler,
    /// A setting is out of range.
    Settings,
    /// The inbox tables do not exist: the database is not migrated.
    NotMigrated,
    /// Postgres failed.
    Database,
    /// JetStream refused the durable consumer.
    JetStream,
    /// The consumer task panicked.
    Panicked,
}

/// A consumer group could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The group name cannot be a JetStream durable name.
    #[error(
        "consumer group name {0:?} is invalid: use letters, digits, `_` and `-`, e.g. `grading`"
    )]
    InvalidGroup(String),
    /// No handler was registered.
    #[error("consumer group `{0}` has no handler; add one with `.on::<Event, _, _>(...)` or `.on_tx::<Event, _>(...)`")]
    NoHandlers(String),
    /// Two handlers were registered for one event type.
    #[error("consumer group `{group}` has two handlers for event `{event}`; register one handler per event type")]
    DuplicateHandler {
        /// The group.
        group: String,
        /// The event name.
        event: &'static str,
    },
    /// A setting is out of range.
    #[error("consumer setting out of range: {0}")]
    Settings(String),
    /// The inbox tables do not exist.
    #[error(
        "the inbox table {inbox} does not exist; call EventService::migrate() at start-up",
        inbox = crate::support::sql::INBOX
    )]
    NotMigrated,
    /// Postgres failed.
    #[error("consumer could not reach Postgres: {0}")]
    Database(#[source] sqlx::Error),
    /// JetStream refused the durable consumer.
    #[error("JetStream refused consumer `{group}` on stream {stream}: {reason}; if its filter changed on a server older than 2.10, delete the consumer (`nats consumer rm {stream} {group}`) and start again")]
    JetStream {
        /// The group.
        group: String,
        /// The stream.
        stream: String,
        /// What JetStream said.
        reason: String,
    },
    /// The consumer task panicked.
    #[error("the consumer task panicked: {0}")]
    Panicked(String),
}

impl ConsumerError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ConsumerErrorKind {
        match self {
            ConsumerError::InvalidGroup(_) => ConsumerErrorKind::InvalidGroup,
            ConsumerError::NoHandlers(_) => ConsumerErrorKind::NoHandlers,
            ConsumerError::DuplicateHandler { .. } => ConsumerErrorKind::DuplicateHandler,
            ConsumerError::Settings(_) => ConsumerErrorKind::Settings,
            ConsumerError::NotMigrated => ConsumerErrorKind::NotMigrated,
            ConsumerError::Database(_) => ConsumerErrorKind::Database,
            ConsumerError::JetStream { .. } => ConsumerErrorKind::JetStream,
            ConsumerError::Panicked(_) => ConsumerErrorKind::Panicked,
        }
    }
}

/// A running consumer group instance; stop it with [`ConsumerHandle::shutdown`].
#[derive(Debug)]
pub struct ConsumerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
}

impl ConsumerHandle {
    /// How many events this instance handled successfully.
    pub fn handled(&self) -> u64 {
        self.stats.handled.load(Ordering::SeqCst)
    }

    /// How many duplicate deliveries the inbox skipped.
    pub fn duplicates(&self) -> u64 {
        self.stats.duplicates.load(Ordering::SeqCst)
    }

    /// How many messages this instance recorded in the dead-letter table.
    pub fn dead_lettered(&self) -> u64 {
        self.stats.dead_lettered.load(Ordering::SeqCst)
    }

    /// **Test only** (the `test-hooks` feature, never enabled in a service): the next
    /// `on_tx` event is committed, then the instance stops without acking or naking
    /// anything, as if its process died there.
    #[cfg(feature = "test-hooks")]
    pub fn crash_after_commit(&self) {
        self.stats.crash_before_ack.store(true, Ordering::SeqCst);
    }

    /// Tells the instance to stop, as [`ConsumerHandle::shutdown`] does, without
    /// waiting for it: it stops fetching at once, and its handlers in flight finish.
    /// Useful to stop several instances together; `shutdown` still waits for this one
    /// (and reports a panic). Calling it again, or after the instance has stopped, does
    /// nothing.
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether the instance has stopped (after a shutdown, or a simulated crash in the
    /// tests).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops fetching, lets handlers in flight finish (up to `shutdown_timeout`), acks
    /// what succeeded, hands queued messages back to JetStream, and returns.
    ///
    /// # Errors
    /// [`ConsumerError::Panicked`] if the consumer task panicked.
    pub async fn shutdown(self) -> Result<(), ConsumerError> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| ConsumerError::Panicked(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_kind() {
        let cases = [
            (
                ConsumerError::InvalidGroup("a b".into()),
                ConsumerErrorKind::InvalidGroup,
            ),
            (
                ConsumerError::NoHandlers("g".into()),
                ConsumerErrorKind::NoHandlers,
            ),
            (
                ConsumerError::DuplicateHandler {
                    group: "g".into(),
                    event: "e",
                },
                ConsumerErrorKind::DuplicateHandler,
            ),
            (
                ConsumerError::Settings("x".into()),
                ConsumerErrorKind::Settings,
            ),
            (ConsumerError::NotMigrated, ConsumerErrorKind::NotMigrated),
            (
                ConsumerError::Database(sqlx::Error::PoolTimedOut),
                ConsumerErrorKind::Database,
            ),
            (
                ConsumerError::JetStream {
                    group: "g".into(),
                    stream: "s".into(),
                    reason: "r".into(),
                },
                ConsumerErrorKind::JetStream,
            ),
            (
                ConsumerError::Panicked("p".into()),
                ConsumerErrorKind::Panicked,
            ),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
        }
    }

    #[test]
    fn the_not_migrated_message_names_the_inbox_table() {
        assert_eq!(
            ConsumerError::NotMigrated.to_string(),
            "the inbox table edupulse.inbox does not exist; call EventService::migrate() at start-up"
        );
    }
}
