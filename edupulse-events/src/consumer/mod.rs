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
mod handle;
mod inbox;
mod instance;
mod lane;
mod replay;
mod route;
mod settings;
mod undeliverable;

pub use builder::{ConsumerBuilder, TxHandlerFn};
pub use dead_letter::{DeadLetter, DeadReason, ParseDeadReasonError, Replay};
#[cfg(feature = "testing")]
pub(crate) use envelope::Via;
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
    /// The instance failed while running and stopped.
    Failed,
}

/// A consumer group could not start.
#[derive(thiserror::Error)]
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
    /// The instance failed while running and stopped; its unacked messages are
    /// redelivered (to another instance, or to this group when it starts again).
    #[error("consumer group `{group}` failed and stopped: {reason}")]
    Failed {
        /// The group.
        group: String,
        /// What failed.
        reason: String,
    },
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
            ConsumerError::Failed { .. } => ConsumerErrorKind::Failed,
        }
    }
}

/// What a consumer instance is doing, as [`ConsumerHandle::status`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerStatus {
    /// Fetching and handling; the last event went through.
    Running,
    /// Running, but the last attempt failed (a handler's error, or Postgres out of
    /// reach): the error. It retries.
    Failing(String),
    /// The instance failed and stopped (see [`ConsumerHandle::failure`]).
    Failed(String),
    /// The instance has stopped.
    Stopped,
}

/// A running consumer group instance; stop it with [`ConsumerHandle::shutdown`].
#[derive(Debug)]
pub struct ConsumerHandle {
    group: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
    failure: watch::Receiver<Option<String>>,
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

    /// How many messages this instance terminated without a dead-letter record because
    /// Postgres refused the record (each is logged with what it held, and stays in the
    /// stream at its sequence). Zero unless something is badly wrong.
    pub fn dead_letters_lost(&self) -> u64 {
        self.stats.dead_letters_lost.load(Ordering::SeqCst)
    }

    /// How many times this instance's NATS client died and was replaced by a new one.
    /// async-nats's reader panics on a header value with a lone carriage return, which
    /// nats-server passes on from any publisher; the instance then goes on with a new
    /// client and the messages it had (see the README's hostile-world section).
    pub fn clients_lost(&self) -> u64 {
        self.stats.clients_lost.load(Ordering::SeqCst)
    }

    /// The last failure of a handler (or Postgres out of reach), if the instance has
    /// handled no event since: what it is retrying. Handler errors are also logged
    /// (`warn`), and become dead letters after `max_deliveries`.
    pub fn last_error(&self) -> Option<String> {
        self.stats.last_error()
    }

    /// What the instance is doing: running (with the last error, if it is failing),
    /// failed, or stopped.
    pub fn status(&self) -> ConsumerStatus {
        if let Some(reason) = self.failure.borrow().clone() {
            return ConsumerStatus::Failed(reason);
        }
        if self.task.is_finished() {
            return ConsumerStatus::Stopped;
        }
        match self.stats.last_error() {
            Some(error) => ConsumerStatus::Failing(error),
            None => ConsumerStatus::Running,
        }
    }

    /// **Test only** (the `test-hooks` feature, never enabled in a service): the next
    /// `on_tx` event is committed, then the instance stops without acking or naking
    /// anything, as if its process died there.
    #[cfg(feature = "test-hooks")]
    pub fn crash_after_commit(&self) {
        self.stats.crash_before_ack.store(true, Ordering::SeqCst);
    }

    /// **Test only** (the `test-hooks` feature, never enabled in a service): the lane
    /// that takes the next message panics, as a bug in the framework would make it.
    #[cfg(feature = "test-hooks")]
    pub fn panic_in_next_lane(&self) {
        self.stats.panic_in_lane.store(true, Ordering::SeqCst);
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

    /// Why the instance failed and stopped while running, if it did (then
    /// [`shutdown`](Self::shutdown) returns the same error).
    pub fn failure(&self) -> Option<ConsumerError> {
        self.failure
            .borrow()
            .clone()
            .map(|reason| ConsumerError::Failed {
                group: self.group.clone(),
                reason,
            })
    }

    /// Waits until the instance fails (never, if it does not): for a supervisor that
    /// restarts the group, or a health check. Returns the failure.
    pub async fn failed(&self) -> ConsumerError {
        let mut failure = self.failure.clone();
        loop {
            if let Some(error) = self.failure() {
                return error;
            }
            if failure.changed().await.is_err() {
                // The instance has ended without failing: it never will.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops fetching, lets handlers in flight finish (up to `shutdown_timeout`), acks
    /// what succeeded, hands queued messages back to JetStream, and returns.
    ///
    /// # Errors
    /// [`ConsumerError::Panicked`] if the consumer task panicked, and
    /// [`ConsumerError::Failed`] if the instance had failed while running (a lane
    /// died); its messages are redelivered.
    pub async fn shutdown(self) -> Result<(), ConsumerError> {
        let _ = self.stop.send(true);
        let failure = self.failure.clone();
        let group = self.group.clone();
        self.task
            .await
            .map_err(|e| ConsumerError::Panicked(e.to_string()))?;
        let reason = failure.borrow().clone();
        match reason.map(|reason| ConsumerError::Failed { group, reason }) {
            Some(error) => Err(error),
            None => Ok(()),
        }
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
            (
                ConsumerError::Failed {
                    group: "g".into(),
                    reason: "r".into(),
                },
                ConsumerErrorKind::Failed,
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

crate::support::debug_as_display!(ConsumerError);
