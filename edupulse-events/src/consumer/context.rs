//! What the fetch loop and the lanes of one running instance share: the service, the
//! group's routes and settings, its counters, and the messages waiting in the lanes'
//! queues.

use super::route::Routes;
use super::settings::ConsumerSettings;
use crate::service::Inner;
use async_nats::jetstream::{AckKind, Message};
use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The counters a [`ConsumerHandle`](super::ConsumerHandle) reports, and (with the
/// `test-hooks` feature) the crash switch of the integration tests.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Events handled successfully.
    pub handled: AtomicU64,
    /// Duplicate deliveries the inbox skipped.
    pub duplicates: AtomicU64,
    /// Messages recorded in the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Messages terminated without a dead-letter record, which Postgres refused.
    pub dead_letters_lost: AtomicU64,
    /// NATS clients of the instance that died and were replaced.
    pub clients_lost: AtomicU64,
    /// The last failure of a handler or of the framework (Postgres out of reach),
    /// until an event is handled again.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// Test hook: the next `on_tx` event is committed, then the instance "dies".
    #[cfg(feature = "test-hooks")]
    pub crash_before_ack: AtomicBool,
    /// Test hook: the instance has "died"; it acks and naks nothing from then on.
    #[cfg(feature = "test-hooks")]
    pub crashed: AtomicBool,
    /// Test hook: the lane that takes the next message panics, as a bug of the
    /// framework's would.
    #[cfg(feature = "test-hooks")]
    pub panic_in_lane: AtomicBool,
}

impl Stats {
    /// Records the last failure.
    pub fn failing(&self, error: String) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(error);
        }
    }

    /// An event went through: the group works.
    pub fn recovered(&self) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = None;
        }
    }

    /// The last failure, if the group has not handled an event since.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|slot| slot.clone())
    }
}

/// One running instance of a group, as its fetch loop and lanes see it.
pub(super) struct Ctx {
    /// The service's connections and configuration.
    pub inner: Arc<Inner>,
    /// Wakes the fetch loop when a simulated crash happens.
    #[cfg(feature = "test-hooks")]
    pub crash: tokio::sync::Notify,
    /// The group's name (its durable consumer's name).
    pub group: String,
    /// The group's handlers, by event name, and the subjects they cover.
    pub routes: Routes,
    /// How the group works.
    pub settings: ConsumerSettings,
    /// The counters the handle reads.
    pub stats: Arc<Stats>,
    /// Messages handed to a lane and waiting in its queue, by reply subject (one per
    /// delivery): the fetch loop sends them progress, so that a long queue is not
    /// redelivered while this instance still has it.
    pub queued: Mutex<BTreeSet<async_nats::Subject>>,
    /// Why the instance failed (a lane died), once it has: the fetch loop stops, and
    /// the handle reports it. Shared by every incarnation of the instance.
    pub failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// The group's own NATS connection: pulls, acks and progress.
    pub nats: async_nats::Client,
    /// The group's metric handles.
    pub metrics: Arc<crate::telemetry::ConsumerMetrics>,
    /// Once the client has died (see `instance`): the messages the lanes had queued,
    /// which they put here instead of handling, for the next incarnation.
    pub carry: Mutex<Option<Vec<Message>>>,
}

impl Ctx {
    /// The instance as it goes on with `nats`, a new connection, after its client's
    /// died: same group, routes, settings, counters and failure, nothing queued.
    pub fn reborn(&self, nats: async_nats::Client) -> Ctx {
        Ctx {
            inner: self.inner.clone(),
            #[cfg(feature = "test-hooks")]
            crash: tokio::sync::Notify::new(),
            group: self.group.clone(),
            routes: self.routes.clone(),
            settings: self.settings.clone(),
            stats: self.stats.clone(),
            queued: Mutex::new(BTreeSet::new()),
            failure: self.failure.clone(),
            nats,
            metrics: self.metrics.clone(),
            carry: Mutex::new(None),
        }
    }

    /// The client has died: from now on the lanes put their queued messages aside
    /// (see [`Ctx::carry_aside`]) instead of handling them.
    pub fn start_carrying(&self) {
        if let Ok(mut carry) = self.carry.lock() {
            carry.get_or_insert_with(Vec::new);
        }
    }

    /// Puts `message` aside for the next incarnation if the client has died; gives it
    /// back otherwise.
    pub fn carry_aside(&self, message: Message) -> Option<Message> {
        match self.carry.lock() {
            Ok(mut carry) => match carry.as_mut() {
                Some(aside) => {
                    aside.push(message);
                    None
                }
                None => Some(message),
            },
            Err(_) => Some(message),
        }
    }

    /// The messages put aside since the client died.
    pub fn carried(&self) -> Vec<Message> {
        self.carry
            .lock()
            .ok()
            .and_then(|mut carry| carry.take())
            .unwrap_or_default()
    }

    /// Whether a simulated crash has happened: the instance then acks and naks nothing.
    /// Always false without the `test-hooks` feature, so the checks compile away.
    #[inline]
    pub fn crashed(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.stats.crashed.load(Ordering::SeqCst);
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// Completes when a simulated crash happens; never without the `test-hooks`
    /// feature.
    pub async fn crash_notified(&self) {
        #[cfg(feature = "test-hooks")]
        self.crash.notified().await;
        #[cfg(not(feature = "test-hooks"))]
        std::future::pending::<()>().await;
    }

    /// Test hook, after an `on_tx` commit: if the crash switch is on, "dies" now (the
    /// lanes and the fetch loop see it) and returns true.
    #[cfg(feature = "test-hooks")]
    pub fn crash_if_asked(&self) -> bool {
        if !self.stats.crash_before_ack.load(Ordering::SeqCst) {
            return false;
        }
        self.stats.crashed.store(true, Ordering::SeqCst);
        self.crash.notify_one();
        true
    }

    /// Fails the instance: it stops fetching and shuts down, and the handle reports
    /// `why` (the first failure is kept).
    pub fn fail(&self, why: String) {
        tracing::error!(group = %self.group, error = %why, "consumer instance failed; it stops");
        self.failure.send_if_modified(|failure| {
            if failure.is_none() {
                *failure = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Notes that `message` waits in a lane's queue.
    pub fn enqueued(&self, message: &Message) {
        if let Some(reply) = &message.reply {
            if let Ok(mut queued) = self.queued.lock() {
                queued.insert(reply.clone());
            }
        }
    }

    /// Notes that `message` has left its lane's queue.
    pub fn dequeued(&self, message: &Message) {
        if let Some(reply) = &message.reply {
            if let Ok(mut queued) = self.queued.lock() {
                queued.remove(reply);
            }
        }
    }

    /// Tells JetStream the messages waiting in the lanes' queues are in progress (what
    /// `ack_with(AckKind::Progress)` sends, to each one's reply subject).
    pub async fn progress_queued(&self) {
        let waiting: Vec<async_nats::Subject> = match self.queued.lock() {
            Ok(queued) => queued.iter().cloned().collect(),
            Err(_) => return,
        };
        if waiting.is_empty() {
            return;
        }
        let client = &self.nats;
        for reply in waiting {
            let _ = client
                .publish(reply, bytes::Bytes::from(AckKind::Progress))
                .await;
        }
    }
}
