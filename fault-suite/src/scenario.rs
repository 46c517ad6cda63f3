//! What the fault scenarios share: a scenario's clock, schedule and scale ([`Run`]),
//! the standard workload (writers, a relay, a consumer group: [`Workload`]), and waits.

use crate::checker::{check, observe, History, Report};
use crate::workload::{
    create_tables, direct_pool, effects_consumer, pending, settle, spawn_writers, suite_consumer,
    try_stream_len, WriterPlan, WriterStats,
};
use crate::{Rng, Scale};
use edupulse_events::EventService;
use edupulse_events_tests::TestEnv;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The consumer group every scenario checks.
pub const GROUP: &str = "effects";

/// A scenario's clock, random schedule and scale.
pub struct Run {
    /// The scenario's name, in every line it prints.
    pub name: &'static str,
    /// Short or long.
    pub scale: Scale,
    /// The fault schedule's randomness.
    pub rng: Rng,
    /// When it began.
    pub started: Instant,
    /// How long the writers of [`start_workload`] spread their events over (10 s,
    /// long: 90 s); a scenario whose faults last longer sets more, so that they all
    /// meet a steady load.
    pub load_over: Duration,
}

impl Run {
    /// Begins a scenario: its scale and seed from the environment, printed.
    pub fn begin(name: &'static str) -> Run {
        crate::logs_from_env();
        let (rng, seed) = Rng::from_env();
        let scale = Scale::from_env();
        println!("[{name}] scale {scale:?}, EDUPULSE_FAULTS_SEED={seed}");
        Run {
            name,
            scale,
            rng,
            started: Instant::now(),
            load_over: scale.pick(Duration::from_secs(10), Duration::from_secs(90)),
        }
    }

    /// Prints a line of the scenario's log.
    pub fn say(&self, what: impl AsRef<str>) {
        println!(
            "[{} +{:.1}s] {}",
            self.name,
            self.started.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }

    /// How long the scenario waits for everything to settle at the end.
    pub fn settle_limit(&self) -> Duration {
        self.scale
            .pick(Duration::from_secs(90), Duration::from_secs(1800))
    }

    /// Waits until everything settled, then reads and checks everything.
    pub async fn finish(
        &self,
        check_pool: &PgPool,
        env: &TestEnv,
        history: &History,
        stop_consumer: impl std::future::Future<Output = ()>,
    ) -> Report {
        let js = env.jetstream().await;
        let settled = settle(check_pool, &js, &env.stream, GROUP, self.settle_limit()).await;
        self.say(format!(
            "settled: {} after {:.1}s ({})",
            settled.reached,
            settled.waited.as_secs_f64(),
            settled.last
        ));
        stop_consumer.await;
        let observed = observe(check_pool, &js, &env.stream, GROUP).await;
        let report = check(history, &observed);
        self.say(format!(
            "{} — {:.1}s in all",
            report.summary(),
            self.started.elapsed().as_secs_f64()
        ));
        report
    }
}

/// Waits until the relay published something after `before` messages, or has nothing
/// left to publish; panics after `limit` (the relay did not recover).
pub async fn wait_progress(
    run: &Run,
    check_pool: &PgPool,
    js: &async_nats::jetstream::Context,
    stream: &str,
    before: u64,
    limit: Duration,
) {
    let started = Instant::now();
    loop {
        let now = try_stream_len(js, stream).await;
        if now.is_some_and(|n| n > before) || pending(check_pool).await == 0 {
            run.say(format!(
                "publishing again after {:.2}s ({now:?} messages)",
                started.elapsed().as_secs_f64()
            ));
            return;
        }
        assert!(
            started.elapsed() < limit,
            "the relay did not publish again within {limit:?} after the fault"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stream length, retried while JetStream recovers.
pub async fn len_now(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    for _ in 0..200 {
        if let Some(n) = try_stream_len(js, stream).await {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stream {stream} did not answer within 20 s");
}

/// Writers of `events` events in all, each paced over `over`.
pub fn writer_plans(writers: u32, events: u64, over: Duration) -> Vec<WriterPlan> {
    (0..writers)
        .map(|w| WriterPlan::new(w, events / u64::from(writers)).paced_over(over))
        .collect()
}

/// Like [`writer_plans`], with more and larger batches (so that relay batches are big
/// enough for a fault to cut one in the middle).
pub fn batchy_plans(writers: u32, events: u64, over: Duration) -> Vec<WriterPlan> {
    (0..writers)
        .map(|w| {
            WriterPlan {
                batch_chance: 0.3,
                max_batch: 40,
                op_timeout: Duration::from_secs(10),
                ..WriterPlan::new(w, events / u64::from(writers))
            }
            .paced_over(over)
        })
        .collect()
}

/// What scenarios 2 and 3 start with: the tables, the relay (on `relay_service`), an
/// in-process consumer (on `consumer_service`) and four writers of 2,000 events (long:
/// 20,000) paced over 10 s (long: 90 s).
pub struct Workload {
    /// A pool straight to the scenario's database, for the checks.
    pub check_pool: PgPool,
    /// The relay.
    pub relay: edupulse_events::RelayHandle,
    /// The consumer group's instance.
    pub consumer: edupulse_events::ConsumerHandle,
    /// JetStream, straight to the shared server.
    pub js: async_nats::jetstream::Context,
    /// What the writers attempted.
    pub history: Arc<History>,
    /// The writers.
    pub writers: Vec<tokio::task::JoinHandle<WriterStats>>,
    /// Dropping it tells the writers to stop.
    pub _stop: watch::Sender<bool>,
}

/// Starts the standard workload: the tables, the relay on `relay_service`, the group
/// recording the effects on `consumer_service`, and the writers.
pub async fn start_workload(
    run: &mut Run,
    env: &TestEnv,
    relay_service: &EventService,
    consumer_service: &EventService,
) -> Workload {
    let consumer = effects_consumer(consumer_service, GROUP, suite_consumer(), "in-process");
    start_workload_with(run, env, relay_service, consumer).await
}

/// Like [`start_workload`], with the consumer group `consumer` (on the group
/// [`GROUP`], recording the effects as [`effects_consumer`] does).
pub async fn start_workload_with(
    run: &mut Run,
    env: &TestEnv,
    relay_service: &EventService,
    consumer: edupulse_events::ConsumerBuilder,
) -> Workload {
    let check_pool = direct_pool(env).await;
    create_tables(&check_pool).await;
    let relay = relay_service.start_relay().await.expect("the relay starts");
    let consumer = consumer.start().await.expect("start the consumer");
    let js = env.jetstream().await;
    let events = run.scale.pick(2_000, 20_000);
    let history = Arc::new(History::new());
    let (stop_tx, stop) = watch::channel(false);
    let writers = spawn_writers(
        relay_service,
        writer_plans(4, events, run.load_over),
        &history,
        &mut run.rng,
        &stop,
    );
    Workload {
        check_pool,
        relay,
        consumer,
        js,
        history,
        writers,
        _stop: stop_tx,
    }
}
