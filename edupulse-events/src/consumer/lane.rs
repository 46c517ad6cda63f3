//! Lanes: the tasks that handle messages, one subject always in the same lane, so in
//! stream order. A lane takes one message at a time from its queue through the
//! handler, retries it in place, and acks, dead-letters or hands it back.

use super::context::Ctx;
use super::dead_letter::{dead_letter, DeadReason, DeadRecord};
use super::envelope::{parse, Delivered, Envelope, Parsed, Via};
use super::handle::{handle, panic_message, Outcome};
use super::route::Route;
use crate::causation::Cause;
use crate::support::retry::{backoff, progress_period, sleep_or_stop};
use crate::telemetry::HandledAs;
use async_nats::jetstream::{AckKind, Message};
use std::any::Any;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

/// The lane of a subject: the same subject always goes to the same lane.
pub(super) fn lane_of(subject: &str, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    subject.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

/// The lanes of an instance: each one's queue and task.
pub(super) struct Lanes(Vec<(mpsc::UnboundedSender<Message>, JoinHandle<()>)>);

impl Lanes {
    /// Starts `settings.concurrency` lanes.
    pub fn start(ctx: &Arc<Ctx>, stop: &watch::Receiver<bool>) -> Lanes {
        let lanes = (0..ctx.settings.concurrency)
            .map(|lane| {
                let (tx, rx) = mpsc::unbounded_channel::<Message>();
                let ctx = ctx.clone();
                let stop = stop.clone();
                let task = tokio::spawn(
                    run_lane(ctx, rx, stop).instrument(tracing::debug_span!("lane", lane)),
                );
                (tx, task)
            })
            .collect();
        Lanes(lanes)
    }

    /// Hands `message` to its lane; false if the lane has gone.
    ///
    /// The lanes' queues are unbounded: the server delivers at most `max_ack_pending`
    /// messages not acked, which bounds them, and the fetch loop never waits on a lane,
    /// so no delivered message waits where it cannot be sent progress (in the pull
    /// stream's own buffer, say) and be redelivered while this instance still has it.
    pub fn dispatch(&self, ctx: &Ctx, message: Message) -> bool {
        let lane = lane_of(message.subject.as_str(), self.0.len());
        ctx.enqueued(&message);
        match self.0[lane].0.send(message) {
            Ok(()) => true,
            Err(mpsc::error::SendError(message)) => {
                ctx.dequeued(&message);
                false
            }
        }
    }

    /// Closes the queues and waits for the lanes to finish the event in hand (and give
    /// queued ones back, or put them aside once the client has died: see
    /// [`Ctx::start_carrying`]), until `deadline`; a lane still busy then is abandoned,
    /// with its queue. True if a lane was abandoned or ended badly (what it had comes
    /// back after `ack_wait`).
    pub async fn close(self, ctx: &Ctx, deadline: Instant) -> bool {
        let (senders, tasks): (Vec<_>, Vec<_>) = self.0.into_iter().unzip();
        drop(senders);
        let mut lost = false;
        for mut task in tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    lost = true;
                    ctx.fail(format!("a lane ended badly: {error}"));
                }
                Err(_) => {
                    lost = true;
                    tracing::warn!("a handler did not finish within shutdown_timeout; abandoning it (its event will be redelivered)");
                    task.abort();
                }
            }
        }
        lost
    }
}

/// A lane: handles the messages of its queue one by one until the queue closes.
async fn run_lane(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut stop: watch::Receiver<bool>,
) {
    let _watch = LaneWatch(&ctx);
    while let Some(message) = rx.recv().await {
        // From here `process` sends progress itself while it works.
        ctx.dequeued(&message);
        // The client has died: the next incarnation takes the message.
        let Some(message) = ctx.carry_aside(message) else {
            continue;
        };
        #[cfg(feature = "test-hooks")]
        if ctx.stats.panic_in_lane.swap(false, Ordering::SeqCst) {
            panic!("test hook: a lane panics");
        }
        if ctx.crashed() {
            // A dead process acks and naks nothing.
            continue;
        }
        if *stop.borrow() {
            give_back(&message).await;
            continue;
        }
        process(&ctx, &message, &mut stop).await;
    }
}

/// Fails the instance if its lane unwinds: user code cannot panic through a lane (its
/// panics are caught as handler failures), so this is a bug of the framework's, and
/// an instance with a dead lane must not go on as if it were healthy.
struct LaneWatch<'a>(&'a Ctx);

impl Drop for LaneWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(
                "a lane panicked (a bug in edupulse-events; please report it); its \
                 messages are redelivered"
                    .to_owned(),
            );
        }
    }
}

/// Takes one message from its lane's queue to its ack, its dead letter or its hand-back.
async fn process(ctx: &Ctx, message: &Message, stop: &mut watch::Receiver<bool>) {
    let delivered = Delivered::of(message);
    let prefix = &ctx.inner.config.subject_prefix;
    match parse(&ctx.routes, &ctx.group, prefix, message, delivered) {
        Parsed::NotOurs => ack(message).await,
        Parsed::Dead(reason, why) => {
            let record = DeadRecord {
                reason,
                why: &why,
                envelope: None,
                deliveries: delivered.count,
                sequence: delivered.sequence,
            };
            dead_letter(ctx, message, stop, record).await;
        }
        Parsed::Event(route, envelope) => {
            let delivery = Delivery {
                ctx,
                message,
                stop,
                route,
                span: tracing::debug_span!(
                    "edupulse.handle",
                    messaging.system = "nats",
                    messaging.operation.type = "process",
                    messaging.destination.name = %message.subject,
                    messaging.message.id = %envelope.id,
                    messaging.consumer.group.name = %ctx.group,
                    event = route.name,
                    id = %envelope.id
                ),
                envelope,
                sequence: delivered.sequence,
                attempt: delivered.count,
                outages: 0,
            };
            let traceparent = message
                .headers
                .as_ref()
                .and_then(|h| h.get(crate::wire::headers::TRACEPARENT));
            crate::telemetry::adopt_traceparent(&delivery.span, traceparent.map(|v| v.as_str()));
            delivery.run().await;
        }
    }
}

/// An event in its lane, tried until it is acked, dead-lettered or handed back.
struct Delivery<'a> {
    /// The instance.
    ctx: &'a Ctx,
    /// The message.
    message: &'a Message,
    /// Whether the instance is shutting down.
    stop: &'a mut watch::Receiver<bool>,
    /// The event's handler.
    route: &'a Route,
    /// The event's envelope (its `attempt` is set on each try).
    envelope: Envelope,
    /// The message's stream sequence.
    sequence: u64,
    /// Which delivery to the handler this is, from JetStream's count, then counted
    /// here as the lane retries.
    attempt: u32,
    /// Retries because Postgres was unreachable, for their backoff; they do not count
    /// toward `max_deliveries`.
    outages: u32,
    /// The span the handler runs in.
    span: tracing::Span,
}

/// What a delivery does after one try.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Ack the message: done.
    Ack,
    /// Nothing more: the instance "died" (a simulated crash).
    #[cfg(feature = "test-hooks")]
    Abandon,
    /// Postgres could not be reached: wait and try again, without counting a delivery.
    WaitOutage(String),
    /// The handler failed: wait and try again, as the next delivery.
    Retry(String),
    /// The handler failed (or panicked) on the last delivery: dead-letter the message.
    GiveUp(DeadReason, String),
}

impl Outcome {
    /// The outcome as the metrics count it (not a simulated crash).
    fn handled_as(&self) -> Option<HandledAs> {
        match self {
            Outcome::Handled => Some(HandledAs::Handled),
            Outcome::Duplicate => Some(HandledAs::Duplicate),
            Outcome::Failed(_) => Some(HandledAs::Failed),
            Outcome::Panicked(_) => Some(HandledAs::Panicked),
            Outcome::Unavailable(_) => Some(HandledAs::Unavailable),
            #[cfg(feature = "test-hooks")]
            Outcome::Crashed => None,
        }
    }

    /// What follows this outcome of delivery `attempt`, of at most `max_deliveries`.
    fn step(self, attempt: u32, max_deliveries: u32) -> Step {
        match self {
            Outcome::Handled | Outcome::Duplicate => Step::Ack,
            #[cfg(feature = "test-hooks")]
            Outcome::Crashed => Step::Abandon,
            Outcome::Unavailable(why) => Step::WaitOutage(why),
            Outcome::Failed(why) if attempt >= max_deliveries => {
                Step::GiveUp(DeadReason::HandlerFailed, why)
            }
            Outcome::Panicked(why) if attempt >= max_deliveries => {
                Step::GiveUp(DeadReason::HandlerPanicked, why)
            }
            Outcome::Failed(why) | Outcome::Panicked(why) => Step::Retry(why),
        }
    }
}

impl Delivery<'_> {
    /// Tries the event until it is done with.
    async fn run(mut self) {
        loop {
            let outcome = match decode(self.route, self.envelope.version, &self.message.payload) {
                Decoded::Event(event) => {
                    let started = Instant::now();
                    let outcome = self.try_once(event).await;
                    if let Some(as_) = outcome.handled_as() {
                        self.ctx
                            .metrics
                            .handled(self.route.name, as_, started.elapsed());
                    }
                    outcome
                }
                Decoded::Panicked(why) => Outcome::Panicked(why),
                Decoded::Refused(why) => {
                    self.give_up(DeadReason::Undecodable, &why).await;
                    return;
                }
            };
            match outcome {
                Outcome::Handled => {
                    self.ctx.stats.handled.fetch_add(1, Ordering::SeqCst);
                    self.ctx.stats.recovered();
                }
                Outcome::Duplicate => {
                    self.ctx.stats.duplicates.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
            let step = outcome.step(self.attempt, self.ctx.settings.max_deliveries);
            let done = match step {
                Step::Ack => {
                    ack(self.message).await;
                    true
                }
                #[cfg(feature = "test-hooks")]
                Step::Abandon => true,
                Step::WaitOutage(why) => self.wait_outage(&why).await,
                Step::Retry(why) => self.retry(&why).await,
                Step::GiveUp(reason, why) => {
                    self.give_up(reason, &why).await;
                    true
                }
            };
            if done {
                return;
            }
        }
    }

    /// Calls the handler once, as the current cause, with progress sent meanwhile.
    async fn try_once(&self, event: Box<dyn Any + Send>) -> Outcome {
        let mut this = self.envelope.clone();
        this.attempt = self.attempt;
        this.via = Via(Some(self.ctx.inner.emitter.clone()));
        let cause = Cause::of(self.envelope.id, self.envelope.correlation_id);
        let handling = cause.scope(handle(self.ctx, self.route, event, this));
        with_progress(self.message, self.ctx.settings.ack_wait, handling)
            .instrument(self.span.clone())
            .await
    }

    /// Waits, in the lane, after Postgres could not be reached. True if the instance is
    /// shutting down (the message has been handed back).
    async fn wait_outage(&mut self, why: &str) -> bool {
        self.outages = self.outages.saturating_add(1);
        let delay = backoff(
            self.ctx.settings.retry_base,
            self.ctx.settings.retry_max,
            i32::try_from(self.outages).unwrap_or(i32::MAX),
        );
        tracing::warn!(
            group = %self.ctx.group, event = self.route.name, id = %self.envelope.id,
            attempt = self.attempt, retry_in = ?delay, error = %why,
            "Postgres is unreachable; retrying (not counted as a failed delivery)"
        );
        self.ctx
            .stats
            .failing(format!("Postgres is unreachable: {why}; retrying"));
        wait_in_lane(self.ctx, self.message, self.stop, delay).await
    }

    /// Waits, in the lane, after the handler failed, and counts the next delivery. True
    /// if the instance is shutting down (the message has been handed back).
    async fn retry(&mut self, why: &str) -> bool {
        self.outages = 0;
        let delay = backoff(
            self.ctx.settings.retry_base,
            self.ctx.settings.retry_max,
            i32::try_from(self.attempt).unwrap_or(i32::MAX),
        );
        tracing::warn!(
            group = %self.ctx.group, event = self.route.name, id = %self.envelope.id,
            attempt = self.attempt, retry_in = ?delay, error = %why, "handler failed; retrying"
        );
        self.ctx.stats.failing(format!(
            "the handler of `{}` failed on event {} (delivery {}): {why}",
            self.route.name, self.envelope.id, self.attempt
        ));
        if wait_in_lane(self.ctx, self.message, self.stop, delay).await {
            return true;
        }
        self.attempt = self.attempt.saturating_add(1);
        false
    }

    /// Records the message in the dead-letter table (then terminates it).
    async fn give_up(&mut self, reason: DeadReason, why: &str) {
        let record = DeadRecord {
            reason,
            why,
            envelope: Some(&self.envelope),
            deliveries: self.attempt,
            sequence: self.sequence,
        };
        dead_letter(self.ctx, self.message, self.stop, record).await;
    }
}

/// Waits `delay` before the next try, in the lane (which keeps later events of the
/// subject behind it) and with progress sent. True if the instance is shutting down:
/// the message has then been handed back for JetStream to redeliver later.
pub(super) async fn wait_in_lane(
    ctx: &Ctx,
    message: &Message,
    stop: &mut watch::Receiver<bool>,
    delay: Duration,
) -> bool {
    let stopping = with_progress(message, ctx.settings.ack_wait, async {
        sleep_or_stop(stop, delay).await
    })
    .await;
    if stopping {
        give_back(message).await;
    }
    stopping
}

/// Runs `work`, telling JetStream the message is still in progress every third of
/// `ack_wait`, so that a slow handler or a retry wait does not cause a redelivery.
async fn with_progress<T>(
    message: &Message,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let period = progress_period(ack_wait);
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Hands a message back for immediate redelivery (to this group's other instances).
pub(super) async fn give_back(message: &Message) {
    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
        tracing::debug!(%error, "could not nak a message; it is redelivered after ack_wait");
    }
}

/// Acks a message; if the ack is lost, JetStream redelivers it.
async fn ack(message: &Message) {
    if let Err(error) = message.ack().await {
        tracing::warn!(%error, "could not ack a message; JetStream will redeliver it");
    }
}

/// What decoding a payload gave.
pub(super) enum Decoded {
    /// The event, for its handler.
    Event(Box<dyn Any + Send>),
    /// It does not decode: it never will.
    Refused(String),
    /// The event type's `Deserialize` panicked: a handler failure.
    Panicked(String),
}

/// Decodes a payload published as `version` for `route`'s handler (the event type's
/// own `Deserialize` runs here, and may panic): in a lane, and for a replay.
pub(super) fn decode(route: &Route, version: u32, payload: &[u8]) -> Decoded {
    match std::panic::catch_unwind(AssertUnwindSafe(|| (route.decode)(version, payload))) {
        Ok(Some(Ok(event))) => Decoded::Event(event),
        Ok(Some(Err(error))) => Decoded::Refused(format!(
            "payload does not decode as `{}` version {version}: {error}",
            route.name
        )),
        // The envelope was only made for a version the route accepts.
        Ok(None) => Decoded::Refused(format!(
            "internal: `{}` version {version} has no path to version {}",
            route.name, route.version
        )),
        Err(panic) => Decoded::Panicked(format!(
            "decoding `{}` panicked: {}",
            route.name,
            panic_message(panic.as_ref())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_always_gets_the_same_lane_in_range() {
        let subjects: Vec<String> = (0..500).map(|i| format!("p.quiz.q{i}.submitted")).collect();
        for lanes in [1, 2, 3, 8, 1024] {
            for subject in &subjects {
                let lane = lane_of(subject, lanes);
                assert!(lane < lanes, "{subject}: {lane} of {lanes}");
                assert_eq!(lane_of(subject, lanes), lane, "{subject}");
                assert_eq!(lane_of(&subject.clone(), lanes), lane, "{subject}");
            }
        }
        assert_eq!(lane_of("anything", 1), 0);
    }

    #[test]
    fn subjects_spread_over_every_lane() {
        let lanes = 8;
        let mut load = vec![0usize; lanes];
        for i in 0..800 {
            load[lane_of(&format!("p.quiz.q{i}.submitted"), lanes)] += 1;
        }
        // 100 each on average; a lane with under a third of that is a broken spread.
        assert!(load.iter().all(|&n| n > 33), "{load:?}");
    }

    #[test]
    fn only_handler_failures_count_toward_max_deliveries() {
        assert_eq!(Outcome::Handled.step(1, 5), Step::Ack);
        assert_eq!(Outcome::Duplicate.step(9, 5), Step::Ack);
        assert_eq!(
            Outcome::Failed("x".into()).step(4, 5),
            Step::Retry("x".into())
        );
        assert_eq!(
            Outcome::Failed("x".into()).step(5, 5),
            Step::GiveUp(DeadReason::HandlerFailed, "x".into())
        );
        assert_eq!(
            Outcome::Failed("x".into()).step(6, 5),
            Step::GiveUp(DeadReason::HandlerFailed, "x".into())
        );
        // A panic is a failure with its own reason.
        assert_eq!(
            Outcome::Panicked("p".into()).step(4, 5),
            Step::Retry("p".into())
        );
        assert_eq!(
            Outcome::Panicked("p".into()).step(5, 5),
            Step::GiveUp(DeadReason::HandlerPanicked, "p".into())
        );
        // An outage never gives up, even past the last delivery.
        assert_eq!(
            Outcome::Unavailable("down".into()).step(5, 5),
            Step::WaitOutage("down".into())
        );
        assert_eq!(
            Outcome::Unavailable("down".into()).step(u32::MAX, 1),
            Step::WaitOutage("down".into())
        );
    }
}
