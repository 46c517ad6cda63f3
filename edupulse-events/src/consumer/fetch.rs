//! The fetch loop of an instance: pulls messages from the durable consumer, passes
//! them through the [`Gate`] to their lanes, sends progress for the messages it holds
//! or queues, and on shutdown hands back what no lane took.

use super::context::Ctx;
use super::gate::Gate;
use super::inbox::spawn_pruner;
use super::instance::client_gone;
use super::lane::{give_back, Lanes};
use super::replay::Replayer;
use super::undeliverable;
use crate::service::nats::Mover;
use crate::support::retry::{progress_period, sleep_or_stop};
use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::Message;
use futures::StreamExt;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How long one pull request lasts. async-nats sends the next one when the last is
/// half used, or, if the server never answers (it has lost the request; the client
/// then reports missed heartbeats), this long plus 5 s after it: a longer expiry made
/// a 35 s stall, seen about once in seven 50,000-message runs against nats-server
/// 2.9.10 (BENCHMARKS.md).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's idle heartbeat on a pull request (at most half of its expiry).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// How often an instance that catches up (see [`Gate`]) reads the group's ack floor.
pub(super) const CATCH_UP_POLL: Duration = Duration::from_millis(50);

/// How long the loop pauses before it pulls anew, after a pull failed or ended.
const PULL_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// Why a fetch loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The instance was told to stop, failed, or (a test hook) crashed.
    Stopped,
    /// The instance's NATS client died: go on with a new one (see `instance`).
    ClientGone,
}

/// What an incarnation whose client died hands to the next one: the messages it held
/// and those its lanes had queued, still pending on the server. The next incarnation
/// acks them through its own client, so a client's death costs them no delivery (under
/// a storm of messages that kill the client, they would otherwise come back after
/// every death, and JetStream would give them up after `max_redeliveries`).
#[derive(Default)]
pub(super) struct Carried {
    /// The gate, with its held messages and its catching up.
    gate: Gate,
    /// The lanes' queued messages, in stream order.
    queued: Vec<Message>,
    /// The stream sequence up to which the scans have read every message (see
    /// `undeliverable::scan`).
    judged: u64,
}

impl Carried {
    /// How many messages are carried.
    pub fn len(&self) -> usize {
        self.gate.held() + self.queued.len()
    }
}

/// Runs one incarnation of an instance, taking over what the last one `carried`:
/// fetches until told to stop (or the simulated crash, or the client's death), then
/// shuts its lanes down. Returns what the next incarnation takes over if the client
/// died, `None` if the instance stops.
pub(super) async fn run(
    ctx: Arc<Ctx>,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
    listener: JoinHandle<()>,
    carried: Carried,
) -> Option<Carried> {
    let mut fetcher = Fetcher::start(ctx, consumer, stop, listener, carried);
    // What was carried has had no progress since the last client died: send it now,
    // before the scan and the first pull.
    fetcher.gate.progress().await;
    fetcher.ctx.progress_queued().await;
    let ended = fetcher.fetch().await;
    fetcher.shut_down(ended).await
}

/// What the fetch loop woke up for.
enum Woke {
    /// A message arrived.
    Message(Box<Message>),
    /// Nothing arrived, but held messages may go now.
    Tick,
    /// The pull stream reported an error (the client may have died).
    Error,
    /// The pull stream ended: pull anew.
    Restart,
    /// The instance is stopping.
    Stop,
}

/// One pull request stream, with the timers that run beside it.
struct Pull {
    /// The messages.
    messages: pull::Stream,
    /// Reads the ack floor while catching up.
    poll: Interval,
    /// Sends progress for held and queued messages.
    progress: Interval,
}

/// The fetch loop's state.
struct Fetcher {
    /// The instance.
    ctx: Arc<Ctx>,
    /// The group's durable consumer.
    consumer: PullConsumer,
    /// Whether the instance is told to stop.
    stop: watch::Receiver<bool>,
    /// Holds messages while catching up.
    gate: Gate,
    /// Where messages are handled.
    lanes: Lanes,
    /// Prunes the inbox in the background.
    pruner: JoinHandle<()>,
    /// Replays the dead letters an operator asked for (see `replay`).
    replayer: Replayer,
    /// Records the messages JetStream gave up delivering (see `undeliverable`).
    listener: JoinHandle<()>,
    /// Tells when the instance has failed (a lane died).
    failure: watch::Receiver<Option<String>>,
    /// How often the instance's connection had been established when last looked at
    /// (0 at first, so that the loop begins with a scan).
    connects: u64,
    /// Moves the client to another server when the group cannot be read on this one.
    mover: Mover,
    /// The stream sequence up to which the scans have read every message.
    judged: u64,
}

impl Fetcher {
    /// Starts the lanes and the inbox pruner.
    fn start(
        ctx: Arc<Ctx>,
        consumer: PullConsumer,
        stop: watch::Receiver<bool>,
        listener: JoinHandle<()>,
        carried: Carried,
    ) -> Fetcher {
        let lanes = Lanes::start(&ctx, &stop);
        let pruner = spawn_pruner(ctx.clone());
        let replayer = Replayer::start(ctx.clone());
        let failure = ctx.failure.subscribe();
        // What the last incarnation had: acked, naked and sent progress through this
        // client from now on, the queued ones back in their lanes first.
        let Carried {
            mut gate,
            queued,
            judged,
        } = carried;
        let context = async_nats::jetstream::new(ctx.nats.clone());
        gate.rebind(&context);
        for mut message in queued {
            message.context = context.clone();
            // The lanes have just started: none has gone.
            lanes.dispatch(&ctx, message);
        }
        Fetcher {
            connects: 0,
            mover: Mover::default(),
            failure,
            listener,
            ctx,
            consumer,
            stop,
            gate,
            judged,
            lanes,
            pruner,
            replayer,
        }
    }

    /// Pulls and dispatches until the instance stops, a lane has gone, the client has
    /// died, or the simulated crash.
    async fn fetch(&mut self) -> Ended {
        loop {
            if *self.stop.borrow() || self.ctx.crashed() || self.failure.borrow().is_some() {
                return Ended::Stopped;
            }
            self.after_reconnect().await;
            if let Some(pull) = self.pull().await {
                if let ControlFlow::Break(ended) = self.follow(pull).await {
                    return ended;
                }
            }
            // The pull could not start, or its stream ended: pause, then pull anew.
            if client_gone(&self.ctx.nats).await {
                return Ended::ClientGone;
            }
            if sleep_or_stop(&mut self.stop, PULL_AGAIN_AFTER).await {
                return Ended::Stopped;
            }
        }
    }

    /// Arms the gate with the group's state and opens a pull stream; `None` if it could
    /// not be opened.
    async fn pull(&mut self) -> Option<Pull> {
        // What the group had been given before this instance pulls: see `Gate`.
        let info = match self.consumer.get_info().await {
            Ok(info) => {
                self.mover.ok();
                self.ctx.metrics.lag(info.num_pending);
                Some(info)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the consumer group's state; holding new messages until ack_wait has passed");
                self.mover
                    .failed(&self.ctx.nats, "reading the consumer group")
                    .await;
                None
            }
        };
        self.gate.arm(info.as_ref(), self.ctx.settings.ack_wait);
        let messages = self
            .consumer
            .stream()
            .max_messages_per_batch(self.ctx.settings.fetch_batch)
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        match messages {
            Ok(messages) => Some(Pull::new(messages, self.ctx.settings.ack_wait)),
            Err(error) => {
                tracing::warn!(%error, "cannot pull from JetStream; retrying");
                None
            }
        }
    }

    /// Follows one pull stream: `Continue` when it ended (pull anew), `Break` when the
    /// instance stops or its client has died.
    async fn follow(&mut self, mut pull: Pull) -> ControlFlow<Ended> {
        let stopped = |flow: ControlFlow<()>| match flow {
            ControlFlow::Break(()) => ControlFlow::Break(Ended::Stopped),
            ControlFlow::Continue(()) => ControlFlow::Continue(()),
        };
        loop {
            let woke = self.wait(&mut pull).await;
            if self.ctx.crashed() {
                return ControlFlow::Break(Ended::Stopped);
            }
            self.after_reconnect().await;
            match woke {
                Woke::Stop => return ControlFlow::Break(Ended::Stopped),
                Woke::Restart => return ControlFlow::Continue(()),
                Woke::Error if client_gone(&self.ctx.nats).await => {
                    return ControlFlow::Break(Ended::ClientGone)
                }
                // Missed heartbeats, say: the consumer's leader may have changed,
                // losing what it had sent; catch up until that has come back.
                Woke::Error => self.rearm().await,
                Woke::Tick => {}
                Woke::Message(message) => stopped(self.on_message(*message))?,
            }
            stopped(self.release())?;
        }
    }

    /// Waits for a message, a timer, the stop or the simulated crash; does what the
    /// timers ask for.
    async fn wait(&mut self, pull: &mut Pull) -> Woke {
        tokio::select! {
            next = pull.messages.next() => match next {
                Some(Ok(message)) => Woke::Message(Box::new(message)),
                Some(Err(error)) => {
                    tracing::debug!(%error, "pull stream error");
                    Woke::Error
                }
                // The pull stream ended (the consumer was deleted, say): start anew.
                None => Woke::Restart,
            },
            _ = self.stop.changed() => Woke::Stop,
            _ = self.ctx.crash_notified() => Woke::Stop,
            _ = self.failure.changed() => Woke::Stop,
            _ = pull.poll.tick(), if self.gate.catching_up() => {
                self.read_floor().await;
                Woke::Tick
            }
            _ = pull.progress.tick() => {
                self.gate.progress().await;
                self.ctx.progress_queued().await;
                Woke::Tick
            }
        }
    }

    /// When the instance's connection has come back since last looked at (whatever
    /// dropped it: a message the client cannot read does), records and terminates the
    /// unreadable messages the group was delivered, then catches up: the events read
    /// with the lost connection come back after `ack_wait`, before anything pulled
    /// since reaches a lane.
    async fn after_reconnect(&mut self) {
        let connects = self.ctx.nats.statistics().connects.load(Ordering::Relaxed);
        if connects == self.connects {
            return;
        }
        self.connects = connects;
        let info = match self.consumer.get_info().await {
            Ok(info) => info,
            Err(error) => {
                tracing::warn!(%error, "cannot read the consumer group's state after a reconnect; holding new messages until ack_wait has passed");
                self.gate.arm(None, self.ctx.settings.ack_wait);
                return;
            }
        };
        // Nothing delivered and unacked: nothing to find (and a group that started at
        // new messages has an ack floor of 0 below messages it was never given).
        let found = if info.num_ack_pending == 0 {
            0
        } else {
            let scanned = undeliverable::scan(
                &self.ctx,
                info.ack_floor.stream_sequence,
                info.delivered.stream_sequence,
                self.judged,
            )
            .await;
            self.judged = scanned.through;
            scanned.found
        };
        if found > 0 {
            tracing::warn!(
                group = %self.ctx.group, found,
                "the connection dropped on messages whose headers the client cannot parse; \
                 they are dead letters now"
            );
        }
        self.gate.arm(Some(&info), self.ctx.settings.ack_wait);
    }

    /// After the pull stream reported an error: arms the gate with the group's state.
    async fn rearm(&mut self) {
        let info = match self.consumer.get_info().await {
            Ok(info) => {
                self.mover.ok();
                Some(info)
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read the consumer group's state after a pull error");
                self.mover
                    .failed(&self.ctx.nats, "reading the consumer group")
                    .await;
                None
            }
        };
        self.gate.arm(info.as_ref(), self.ctx.settings.ack_wait);
    }

    /// Reads the group's state for the gate, while catching up.
    async fn read_floor(&mut self) {
        match self.consumer.get_info().await {
            Ok(info) => self.gate.observe(&info),
            Err(error) => {
                tracing::debug!(%error, "cannot read the group's ack floor");
                self.gate.unreadable();
            }
        }
    }

    /// Passes a received message through the gate to its lane.
    fn on_message(&mut self, message: Message) -> ControlFlow<()> {
        if let Ok(info) = message.info() {
            self.ctx.metrics.lag(info.pending);
        }
        match self.gate.admit(message) {
            Some(message) => self.dispatch(message),
            None => ControlFlow::Continue(()),
        }
    }

    /// Hands the held messages that may go now to their lanes.
    fn release(&mut self) -> ControlFlow<()> {
        while let Some(message) = self.gate.next_release() {
            self.dispatch(message)?;
        }
        ControlFlow::Continue(())
    }

    /// Hands a message to its lane: `Break` if the lane has gone.
    fn dispatch(&self, message: Message) -> ControlFlow<()> {
        if self.lanes.dispatch(&self.ctx, message) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    /// Stops the pruner, hands back the held messages, lets the lanes finish (up to
    /// `shutdown_timeout`) and flushes the acks. If the client has died (`ended`), the
    /// held messages and the lanes' queued ones are not handed back (that would need
    /// the client) but returned, for the next incarnation.
    async fn shut_down(mut self, ended: Ended) -> Option<Carried> {
        if ended == Ended::ClientGone {
            // At once: a lane that took a queued message now would ack it through the
            // dead client.
            self.ctx.start_carrying();
        }
        self.pruner.abort();
        self.replayer.stop(self.ctx.settings.shutdown_timeout).await;
        self.listener.abort();
        if ended == Ended::ClientGone {
            self.ctx.stats.clients_lost.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + self.ctx.settings.shutdown_timeout;
            if self.lanes.close(&self.ctx, deadline).await {
                // An abandoned lane dropped its event in hand and its queue: they come
                // back after ack_wait, so the gate may not count them as in a lane.
                self.gate.lanes_lost();
            }
            let mut queued = self.ctx.carried();
            queued.sort_by_key(|message| message.info().map_or(0, |info| info.stream_sequence));
            let carried = Carried {
                gate: self.gate,
                queued,
                judged: self.judged,
            };
            tracing::info!(
                carried = carried.len(),
                "the instance's client died; the next one takes over its messages"
            );
            return Some(carried);
        }
        if !self.ctx.crashed() {
            // Not handed to a lane: back to JetStream, like the lanes' queued messages.
            for message in self.gate.take_held() {
                give_back(&message).await;
            }
        }
        // Stop fetching; lanes finish the event in hand and give queued ones back.
        let deadline = Instant::now() + self.ctx.settings.shutdown_timeout;
        self.lanes.close(&self.ctx, deadline).await;
        if !self.ctx.crashed() {
            // Acks are published without waiting; make sure they left.
            let _ = self.ctx.nats.flush().await;
        }
        tracing::info!("consumer stopped");
        None
    }
}

impl Pull {
    /// A pull stream, with its timers started.
    fn new(messages: pull::Stream, ack_wait: Duration) -> Pull {
        let mut poll = tokio::time::interval(CATCH_UP_POLL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let period = progress_period(ack_wait);
        let mut progress = tokio::time::interval_at(Instant::now() + period, period);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Pull {
            messages,
            poll,
            progress,
        }
    }
}
