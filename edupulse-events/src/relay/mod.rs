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

mod election;
mod fence;
mod leader;
mod mark;
mod prune;
mod publish;
mod read;
mod settings;
mod wake;

pub use settings::RelaySettings;

use crate::service::EventService;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    #[cfg(feature = "test-hooks")]
    crash_before_mark: AtomicBool,
}

/// The relay task ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay task panicked; its events stay pending for the next relay.
    #[error("the relay task panicked: {0}; pending events stay in the outbox for the next relay")]
    Panicked(String),
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

    /// For tests only (feature `test-hooks`): at its next batch the relay publishes,
    /// then drops its leader connection without marking the rows and stops, as if its
    /// process died there.
    #[cfg(feature = "test-hooks")]
    pub fn crash_before_mark(&self) {
        self.state.crash_before_mark.store(true, Ordering::SeqCst);
    }

    /// Whether the relay task has ended (after a shutdown, or a simulated crash).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the relay: the batch in flight is published and marked, the lead is
    /// released, and the task ends.
    ///
    /// # Errors
    /// [`RelayError::Panicked`] if the relay task panicked.
    pub async fn shutdown(self) -> Result<(), RelayError> {
        // The task may have ended already; then there is nobody to tell.
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| RelayError::Panicked(e.to_string()))
    }
}

impl EventService {
    /// Starts a relay on the current tokio runtime. Dropping the handle stops it. Run
    /// one per replica: one leads, the others stand by.
    #[must_use = "dropping the handle stops the relay"]
    pub fn start_relay(&self) -> RelayHandle {
        let (stop, stop_rx) = watch::channel(false);
        let state = Arc::new(RelayState::default());
        let task = tokio::spawn(election::run(self.inner.clone(), stop_rx, state.clone()));
        RelayHandle { stop, task, state }
    }
}
