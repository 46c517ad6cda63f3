//! The fetch loop of an instance: pulls messages from the durable consumer, passes
//! them through the [`Gate`] to their lanes, sends progress for the messages it holds
//! or queues, and on shutdown hands back what no lane took.

use super::context::Ctx;
use super::gate::{acked_through, Gate};
use super::inbox::spawn_pruner;
use super::lane::{give_back, Lanes};
use crate::support::retry::{progress_period, sleep_or_stop};
use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::Message;
use futures::StreamExt;
use std::ops::ControlFlow;
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

/// Runs an instance: fetches until told to stop (or the simulated crash), then shuts
/// its lanes down.
pub(super) async fn run(
    ctx: Arc<Ctx>,
    consumer: PullConsumer,
    stop: watch::Receiver<bool>,
    listener: JoinHandle<()>,
) {
    let mut fetcher = Fetcher::start(ctx, consumer, stop, listener);
    fetcher.fetch().await;
    fetcher.shut_down().await;
}

/// What the fetch loop woke up for.
enum Woke {
    /// A message arrived.
    Message(Box<Message>),
    /// Nothing arrived, but held messages may go now.
    Tick,
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
    /// Records the messages JetStream gave up delivering (see `undeliverable`).
    listener: JoinHandle<()>,
    /// Tells when the instance has failed (a lane died).
    failure: watch::Receiver<Option<String>>,
}

impl Fetcher {
    /// Starts the lanes and the inbox pruner.
    fn start(
        ctx: Arc<Ctx>,
        consumer: PullConsumer,
        stop: watch::Receiver<bool>,
        listener: JoinHandle<()>,
    ) -> Fetcher {
        let lanes = Lanes::start(&ctx, &stop);
        let pruner = spawn_pruner(ctx.clone());
        let failure = ctx.failure.subscribe();
        Fetcher {
            failure,
            listener,
            ctx,
            consumer,
            stop,
            gate: Gate::default(),
            lanes,
            pruner,
        }
    }

    /// Pulls and dispatches until the instance stops, a lane has gone, or the simulated
    /// crash.
    async fn fetch(&mut self) {
        loop {
            if *self.stop.borrow() || self.ctx.crashed() || self.failure.borrow().is_some() {
                return;
            }
            if let Some(pull) = self.pull().await {
                if self.follow(pull).await.is_break() {
                    return;
                }
            }
            // The pull could not start, or its stream ended: pause, then pull anew.
            if sleep_or_stop(&mut self.stop, PULL_AGAIN_AFTER).await {
                return;
            }
        }
    }

    /// Arms the gate with the group's state and opens a pull stream; `None` if it could
    /// not be opened.
    async fn pull(&mut self) -> Option<Pull> {
        // What the group had been given before this instance pulls: see `Gate`.
        let info = match self.consumer.get_info().await {
            Ok(info) => Some(info),
            Err(error) => {
                tracing::warn!(%error, "cannot read the consumer group's state; holding new messages until ack_wait has passed");
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
    /// instance stops.
    async fn follow(&mut self, mut pull: Pull) -> ControlFlow<()> {
        loop {
            let woke = self.wait(&mut pull).await;
            if self.ctx.crashed() {
                return ControlFlow::Break(());
            }
            match woke {
                Woke::Stop => return ControlFlow::Break(()),
                Woke::Restart => return ControlFlow::Continue(()),
                Woke::Tick => {}
                Woke::Message(message) => self.on_message(*message)?,
            }
            self.release()?;
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
                    Woke::Tick
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

    /// Reads the group's ack floor for the gate, while catching up.
    async fn read_floor(&mut self) {
        match self.consumer.get_info().await {
            Ok(info) => self.gate.observe_floor(acked_through(&info)),
            Err(error) => {
                tracing::debug!(%error, "cannot read the group's ack floor");
                self.gate.check_done();
            }
        }
    }

    /// Passes a received message through the gate to its lane.
    fn on_message(&mut self, message: Message) -> ControlFlow<()> {
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
    /// `shutdown_timeout`) and flushes the acks.
    async fn shut_down(mut self) {
        self.pruner.abort();
        self.listener.abort();
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
