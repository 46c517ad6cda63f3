//! The relay: publishes committed outbox events to JetStream, in sequence order, once.
//!
//! Any number of relays may run; the one holding a Postgres advisory lock on its own
//! connection leads ([`election`]), and does all its reading and waiting on that
//! connection, so a relay that loses the connection loses the lead at its next
//! statement. Standbys try the lock every `standby_interval`.
//!
//! The path of a batch, one file each: [`fence`] (wait for writers holding earlier
//! sequence numbers), [`read`] (the next pending events), [`publish`] (the chain of
//! expected predecessors, and what a failure means), [`mark`] (the relay's mark, on a
//! connection of its own), [`prune`] (published rows past the retention), [`wake`]
//! (the idle flag and LISTEN). [`leader`] runs them in a loop.

mod atomic;
mod election;
mod fence;
mod leader;
mod mark;
mod prune;
mod publish;
mod read;
mod settings;
mod wake;

pub use election::RELAY_LEADER_LOCK;
pub use settings::{AtomicBatches, RelaySettings};

use crate::service::EventService;
use crate::support::pg::is_undefined_table;
use crate::support::sql::RELAY_PROGRESS;
use const_format::formatcp;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running relay; stop it with [`RelayHandle::shutdown`].
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    state: Arc<RelayState>,
}

/// What a relay's task shares with its handle.
#[derive(Debug, Default)]
struct RelayState {
    leader: AtomicBool,
    published: AtomicU64,
    sent: AtomicU64,
    batches: AtomicU64,
    atomic_batches: AtomicU64,
    /// What keeps the relay from publishing now, if anything (cleared once it
    /// publishes, stands by or finds nothing to do).
    problem: Mutex<Option<String>>,
    #[cfg(feature = "test-hooks")]
    crash_before_mark: AtomicBool,
}

impl RelayState {
    /// Records what keeps the relay from publishing.
    pub(super) fn failing(&self, problem: impl Into<String>) {
        if let Ok(mut slot) = self.problem.lock() {
            *slot = Some(problem.into());
        }
    }

    /// The relay works again.
    pub(super) fn recovered(&self) {
        if let Ok(mut slot) = self.problem.lock() {
            *slot = None;
        }
    }

    fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|slot| slot.clone())
    }
}

/// What a relay is doing, as [`RelayHandle::status`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayStatus {
    /// Another relay leads; this one takes over when it stops.
    Standby,
    /// This relay leads and publishes.
    Leading,
    /// Something keeps this relay from publishing or leading: the last error. It
    /// retries (see [`RelaySettings`]); the error says what to check.
    Failing(String),
    /// The relay task has ended.
    Stopped,
}

const CHECK_SCHEMA: &str = formatcp!("SELECT 1 FROM {RELAY_PROGRESS} LIMIT 0");

/// The relay task ended badly.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay task panicked; its events stay pending for the next relay.
    #[error("the relay task panicked: {0}; pending events stay in the outbox for the next relay")]
    Panicked(String),
    /// The outbox tables do not exist: the relay was not started.
    #[error("the outbox tables (schema edupulse) do not exist; call EventService::migrate() before start_relay()")]
    NotMigrated,
    /// The relay was failing when it was shut down (it had been retrying): the last
    /// error. Committed events stay pending for the next relay.
    #[error("the relay was failing when it stopped: {0}")]
    Failing(String),
}

impl RelayHandle {
    /// Whether this relay currently leads (publishes).
    pub fn is_leader(&self) -> bool {
        self.state.leader.load(Ordering::SeqCst)
    }

    /// How many events this relay has published and marked.
    pub fn published(&self) -> u64 {
        self.state.published.load(Ordering::SeqCst)
    }

    /// How many messages this relay has sent to JetStream, retries included. In a run
    /// without failures it equals [`published`](Self::published): nothing is sent
    /// twice and left to JetStream's duplicate removal.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::SeqCst)
    }

    /// How many batches this relay has published (`published / batches` is the
    /// average batch).
    pub fn batches(&self) -> u64 {
        self.state.batches.load(Ordering::SeqCst)
    }

    /// How many atomic batches JetStream has stored whole for this relay (see
    /// [`AtomicBatches`]): zero when the relay publishes each event with its own
    /// acknowledgement.
    pub fn atomic_batches(&self) -> u64 {
        self.state.atomic_batches.load(Ordering::SeqCst)
    }

    /// For tests only (feature `test-hooks`): at its next batch the relay publishes,
    /// then drops its leader connection without marking the rows and stops, as if its
    /// process died there.
    #[cfg(feature = "test-hooks")]
    pub fn crash_before_mark(&self) {
        self.state.crash_before_mark.store(true, Ordering::SeqCst);
    }

    /// What the relay is doing now: leading, standing by, failing (with the last
    /// error), or stopped.
    pub fn status(&self) -> RelayStatus {
        if self.task.is_finished() {
            return RelayStatus::Stopped;
        }
        if let Some(problem) = self.state.problem() {
            return RelayStatus::Failing(problem);
        }
        if self.is_leader() {
            RelayStatus::Leading
        } else {
            RelayStatus::Standby
        }
    }

    /// The error that keeps the relay from publishing now, if any.
    pub fn last_error(&self) -> Option<String> {
        self.state.problem()
    }

    /// Whether the relay task has ended (after a shutdown, or a simulated crash).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the relay: the batch in flight is published and marked, the lead is
    /// released, and the task ends.
    ///
    /// # Errors
    /// [`RelayError::Panicked`] if the relay task panicked, [`RelayError::Failing`]
    /// with the last error if it was failing (not publishing) when it stopped.
    pub async fn shutdown(self) -> Result<(), RelayError> {
        // The task may have ended already; then there is nobody to tell.
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| RelayError::Panicked(e.to_string()))?;
        match self.state.problem() {
            Some(problem) => Err(RelayError::Failing(problem)),
            None => Ok(()),
        }
    }
}

impl EventService {
    /// Starts a relay on the current tokio runtime. Dropping the handle stops it. Run
    /// one per replica: one leads, the others stand by. Watch it with
    /// [`RelayHandle::status`]; it logs through `tracing`.
    ///
    /// # Errors
    /// [`RelayError::NotMigrated`] when the outbox tables do not exist. Any other
    /// failure (Postgres or NATS out of reach) does not stop it from starting: it
    /// retries, and [`RelayHandle::status`] shows the failure.
    pub async fn start_relay(&self) -> Result<RelayHandle, RelayError> {
        match sqlx::query(CHECK_SCHEMA).execute(&self.inner.pool).await {
            Err(error) if is_undefined_table(&error) => return Err(RelayError::NotMigrated),
            Err(error) => {
                tracing::warn!(%error, "cannot check the outbox schema; starting the relay anyway");
            }
            Ok(_) => {}
        }
        let (stop, stop_rx) = watch::channel(false);
        let state = Arc::new(RelayState::default());
        let task = tokio::spawn(election::run(self.inner.clone(), stop_rx, state.clone()));
        Ok(RelayHandle { stop, task, state })
    }
}

crate::support::debug_as_display!(RelayError);
