//! The workload of every scenario: the business and effects tables, writers that
//! commit (or roll back) a business row and its event in one transaction, the
//! consumer that records each event's effect, and waiting until everything settled.

use crate::checker::{History, Outcome};
use crate::{Rng, Tick};
use async_nats::jetstream;
use edupulse_events::{
    ConsumerBuilder, ConsumerSettings, EventService, HandlerError, Received, RelaySettings,
};
use edupulse_events_tests::TestEnv;
use futures::future::BoxFuture;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The tables the suite writes besides the outbox: `fault_business`, one row per
/// committed `(writer, counter)` (written in the emitting transaction, so it is the
/// truth of what committed), and `fault_effects`, one row per handler run that
/// committed, deliberately without a unique key so that a duplicate shows.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fault_business (
    writer  INT NOT NULL,
    counter BIGINT NOT NULL,
    PRIMARY KEY (writer, counter)
);
CREATE TABLE IF NOT EXISTS fault_effects (
    applied  BIGSERIAL PRIMARY KEY,
    event_id UUID NOT NULL,
    writer   INT NOT NULL,
    counter  BIGINT NOT NULL,
    instance TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fault_effects_key ON fault_effects (writer, counter);
";

/// Creates the suite's tables.
///
/// # Panics
/// If Postgres fails (tests only).
pub async fn create_tables(pool: &PgPool) {
    sqlx::raw_sql(SCHEMA)
        .execute(pool)
        .await
        .expect("create the suite's tables");
}

/// A small pool straight to the scenario's database, never through a proxy: the
/// suite watches and checks with it.
///
/// # Panics
/// If Postgres does not answer (tests only).
pub async fn direct_pool(env: &TestEnv) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
        .connect(&env.database_url)
        .await
        .expect("connect the checker to the test database")
}

/// Relay settings for the suite: short intervals, a 1 s ack timeout, quick retries.
pub fn suite_relay() -> RelaySettings {
    RelaySettings {
        poll_interval: Duration::from_millis(100),
        standby_interval: Duration::from_millis(100),
        ack_timeout: Duration::from_secs(1),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        ..RelaySettings::default()
    }
}

/// Consumer settings for the suite: quick retries, a 2 s ack wait, and so many
/// deliveries that an injected fault never dead-letters an event (a dead letter
/// would show as lost).
pub fn suite_consumer() -> ConsumerSettings {
    ConsumerSettings {
        max_deliveries: 10_000,
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(500),
        ack_wait: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(10),
        ..ConsumerSettings::default()
    }
}

/// The scenario's configuration: its database, stream and prefix, the suite's relay
/// settings, a pool of 6 and a 2 s connect timeout.
pub fn suite_config(env: &TestEnv) -> edupulse_events::ConfigBuilder {
    env.config()
        .relay(suite_relay())
        .max_connections(6)
        .connect_timeout(Duration::from_secs(2))
}

/// Records one handled event's effect in `fault_effects`, inside the handler's
/// transaction.
pub fn record_effect<'c>(
    tx: &'c mut PgConnection,
    received: Received<Tick>,
    instance: Arc<str>,
) -> BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        sqlx::query(
            "INSERT INTO fault_effects (event_id, writer, counter, instance)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(received.envelope.id)
        .bind(i32::try_from(received.event.writer)?)
        .bind(i64::try_from(received.event.counter)?)
        .bind(&*instance)
        .execute(&mut *tx)
        .await?;
        Ok(())
    })
}

/// A consumer group that records every [`Tick`]'s effect with `on_tx`, labelled
/// `instance`.
pub fn effects_consumer(
    service: &EventService,
    group: &str,
    settings: ConsumerSettings,
    instance: &str,
) -> ConsumerBuilder {
    let instance: Arc<str> = Arc::from(instance);
    service
        .consumer(group)
        .settings(settings)
        .on_tx::<Tick, _>(move |tx, received| record_effect(tx, received, instance.clone()))
}

/// What one writer does.
#[derive(Debug, Clone)]
pub struct WriterPlan {
    /// The writer's number (the event's subject token).
    pub writer: u32,
    /// How many counters (events) it uses up, committed or not.
    pub events: u64,
    /// The chance that a transaction writes a batch (`emit_all_in`) instead of one event.
    pub batch_chance: f64,
    /// The largest batch.
    pub max_batch: u64,
    /// The chance that a transaction is rolled back on purpose.
    pub rollback_chance: f64,
    /// The mean pause between transactions (zero: none).
    pub pace: Duration,
    /// How long a transaction may take before it is abandoned.
    pub op_timeout: Duration,
    /// While this reads true, the writer waits (back-pressure for long runs).
    pub gate: Option<watch::Receiver<bool>>,
    /// If set, each transaction stays open for a random time in this range (in
    /// milliseconds) after its events are written, holding its connection.
    pub hold_ms: Option<(u64, u64)>,
}

impl WriterPlan {
    /// A writer of `events` events: mostly single events, 15% batches of up to 10, 5%
    /// rolled back, no pause.
    pub fn new(writer: u32, events: u64) -> WriterPlan {
        WriterPlan {
            writer,
            events,
            batch_chance: 0.15,
            max_batch: 10,
            rollback_chance: 0.05,
            pace: Duration::ZERO,
            op_timeout: Duration::from_secs(30),
            gate: None,
            hold_ms: None,
        }
    }

    /// Spreads the writer's transactions so that it takes about `total`.
    pub fn paced_over(mut self, total: Duration) -> WriterPlan {
        let mean_batch = 1.0 + self.batch_chance * (self.max_batch as f64 / 2.0);
        let ops = (self.events as f64 / mean_batch).max(1.0);
        self.pace = total.div_f64(ops);
        self
    }
}

/// What a writer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed.
    pub committed: u64,
    /// Transactions rolled back on purpose.
    pub rolled_back: u64,
    /// Transactions that failed before their commit (not committed).
    pub failed: u64,
    /// Transactions whose commit had no answer (committed or not).
    pub unknown: u64,
}

impl std::ops::AddAssign for WriterStats {
    fn add_assign(&mut self, other: WriterStats) {
        self.committed += other.committed;
        self.rolled_back += other.rolled_back;
        self.failed += other.failed;
        self.unknown += other.unknown;
    }
}

/// Runs one writer to the end of its plan (or until `stop` reads true): each
/// transaction inserts its counters into `fault_business` and emits their events,
/// then commits or rolls back. Every outcome goes to `history`.
pub async fn run_writer(
    service: EventService,
    mut plan: WriterPlan,
    history: Arc<History>,
    mut rng: Rng,
    stop: watch::Receiver<bool>,
) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut counter = 0u64;
    while counter < plan.events && !*stop.borrow() {
        if let Some(gate) = plan.gate.as_mut() {
            while *gate.borrow_and_update() && !*stop.borrow() {
                let _ = tokio::time::timeout(Duration::from_millis(100), gate.changed()).await;
            }
        }
        let n = if rng.chance(plan.batch_chance) {
            rng.between(2, plan.max_batch).min(plan.events - counter)
        } else {
            1
        };
        let rollback = rng.chance(plan.rollback_chance);
        let hold = plan.hold_ms.map(|(low, high)| rng.millis(low, high));
        let committing = AtomicBool::new(false);
        let outcome = match tokio::time::timeout(
            plan.op_timeout,
            transaction(
                &service,
                Op {
                    writer: plan.writer,
                    first: counter,
                    n,
                    rollback,
                    hold,
                },
                &committing,
            ),
        )
        .await
        {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => {
                if committing.load(Ordering::SeqCst) {
                    Outcome::Unknown
                } else {
                    Outcome::Failed
                }
            }
        };
        match outcome {
            Outcome::Committed => stats.committed += 1,
            Outcome::RolledBack => stats.rolled_back += 1,
            Outcome::Failed => stats.failed += 1,
            Outcome::Unknown => stats.unknown += 1,
        }
        history.record(plan.writer, counter..counter + n, outcome);
        counter += n;
        if !plan.pace.is_zero() {
            let pace = plan.pace.as_micros() as u64;
            tokio::time::sleep(Duration::from_micros(rng.between(0, pace * 2))).await;
        }
    }
    stats
}

/// One business transaction of a writer.
struct Op {
    writer: u32,
    first: u64,
    n: u64,
    rollback: bool,
    hold: Option<Duration>,
}

/// One business transaction: rows and events for counters `first..first + n`.
async fn transaction(
    service: &EventService,
    op: Op,
    committing: &AtomicBool,
) -> Result<Outcome, HandlerError> {
    let Op {
        writer,
        first,
        n,
        rollback,
        hold,
    } = op;
    let counters: Vec<i64> = (first..first + n)
        .map(i64::try_from)
        .collect::<Result<_, _>>()?;
    let mut tx = service.pool().begin().await?;
    sqlx::query(
        "INSERT INTO fault_business (writer, counter) SELECT $1, c FROM unnest($2::int8[]) AS c",
    )
    .bind(i32::try_from(writer)?)
    .bind(&counters)
    .execute(&mut *tx)
    .await?;
    if n == 1 {
        service
            .emit_in(
                &mut tx,
                Tick {
                    writer,
                    counter: first,
                },
            )
            .await?;
    } else {
        service
            .emit_all_in(
                &mut tx,
                (first..first + n).map(|counter| Tick { writer, counter }),
            )
            .await?;
    }
    if let Some(hold) = hold {
        tokio::time::sleep(hold).await;
    }
    if rollback {
        tx.rollback().await?;
        return Ok(Outcome::RolledBack);
    }
    committing.store(true, Ordering::SeqCst);
    tx.commit().await?;
    Ok(Outcome::Committed)
}

/// Starts `plans` as writer tasks; returns their join handles.
pub fn spawn_writers(
    service: &EventService,
    plans: Vec<WriterPlan>,
    history: &Arc<History>,
    rng: &mut Rng,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<WriterStats>> {
    plans
        .into_iter()
        .map(|plan| {
            tokio::spawn(run_writer(
                service.clone(),
                plan,
                history.clone(),
                rng.fork(),
                stop.clone(),
            ))
        })
        .collect()
}

/// Waits for writer tasks; sums their stats.
///
/// # Panics
/// If a writer task panicked.
pub async fn join_writers(writers: Vec<tokio::task::JoinHandle<WriterStats>>) -> WriterStats {
    let mut total = WriterStats::default();
    for writer in writers {
        total += writer.await.expect("a writer task panicked");
    }
    total
}

/// Pending events in the outbox.
///
/// # Panics
/// If Postgres fails (tests only).
pub async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM edupulse.pending_events")
        .fetch_one(pool)
        .await
        .expect("count pending events")
}

/// How many messages the stream holds.
///
/// # Panics
/// If JetStream does not answer (tests only).
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("the stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// The state of a consumer group on the server: (not yet delivered, delivered and
/// not acked, ack floor's stream sequence); `None` if the group does not exist yet.
pub async fn group_state(
    js: &jetstream::Context,
    stream: &str,
    group: &str,
) -> Option<(u64, usize, u64)> {
    let stream = js.get_stream(stream).await.ok()?;
    let info = stream.consumer_info(group).await.ok()?;
    Some((
        info.num_pending,
        info.num_ack_pending,
        info.ack_floor.stream_sequence,
    ))
}

/// Commits `size` events of `writer` (and their business rows) in one transaction, and
/// records them in `history`.
///
/// # Panics
/// If Postgres or the emit fails (tests only).
pub async fn burst(service: &EventService, history: &History, writer: u32, size: u64) {
    let mut tx = service.pool().begin().await.expect("begin the burst");
    let counters: Vec<i64> = (0..i64::try_from(size).expect("small burst")).collect();
    sqlx::query(
        "INSERT INTO fault_business (writer, counter) SELECT $1, c FROM unnest($2::int8[]) AS c",
    )
    .bind(i32::try_from(writer).expect("small writer"))
    .bind(&counters)
    .execute(&mut *tx)
    .await
    .expect("the burst's business rows");
    service
        .emit_all_in(&mut tx, (0..size).map(|counter| Tick { writer, counter }))
        .await
        .expect("emit the burst");
    tx.commit().await.expect("commit the burst");
    history.record(writer, 0..size, Outcome::Committed);
}

/// How a wait for quiescence ended.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Whether everything settled before the limit.
    pub reached: bool,
    /// How long it took.
    pub waited: Duration,
    /// The last state seen, for the report.
    pub last: String,
}

/// Waits (up to `limit`) until the outbox has nothing pending, every committed
/// business row has its effect, and the group has nothing undelivered or unacked.
/// Does not panic on the limit: the checker then says what is missing. Prints the
/// state every 5 s while it waits.
pub async fn settle(
    pool: &PgPool,
    js: &jetstream::Context,
    stream: &str,
    group: &str,
    limit: Duration,
) -> Settled {
    let started = Instant::now();
    let mut last_said = Instant::now();
    loop {
        let row: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT
                (SELECT count(*) FROM edupulse.pending_events),
                (SELECT count(*) FROM fault_business b WHERE NOT EXISTS (
                    SELECT 1 FROM fault_effects e
                    WHERE e.writer = b.writer AND e.counter = b.counter))",
        )
        .fetch_one(pool)
        .await;
        let group = group_state(js, stream, group).await;
        let last;
        if let (Ok((pending, unhandled)), Some((undelivered, unacked, _))) = (&row, group) {
            last = format!(
                "pending {pending}, unhandled {unhandled}, undelivered {undelivered}, unacked {unacked}"
            );
            if *pending == 0 && *unhandled == 0 && undelivered == 0 && unacked == 0 {
                return Settled {
                    reached: true,
                    waited: started.elapsed(),
                    last,
                };
            }
        } else {
            last = format!("cannot read the state: {row:?} {group:?}");
        }
        if last_said.elapsed() >= Duration::from_secs(5) {
            println!(
                "settling for {:.0}s: {last}",
                started.elapsed().as_secs_f64()
            );
            last_said = Instant::now();
        }
        if started.elapsed() >= limit {
            return Settled {
                reached: false,
                waited: started.elapsed(),
                last,
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Like [`stream_len`], but `None` while JetStream does not answer (a server being
/// restarted, say).
pub async fn try_stream_len(js: &jetstream::Context, stream: &str) -> Option<u64> {
    let mut stream = js.get_stream(stream).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

/// Outbox rows that needed more than one publish attempt (a failure or an ack timeout
/// before the success; `attempts` counts the failed ones): the trace that a fault hit
/// publishing.
///
/// # Panics
/// If Postgres fails (tests only).
pub async fn retried(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM edupulse.outbox WHERE attempts > 0 AND status <> 'dead'",
    )
    .fetch_one(pool)
    .await
    .expect("count retried events")
}

/// The backend pid and application name holding the relay's leader lock in this
/// database, if any.
///
/// # Panics
/// If Postgres fails (tests only).
pub async fn leader(pool: &PgPool) -> Option<(i32, String)> {
    sqlx::query_as(
        "SELECT l.pid, coalesce(a.application_name, '')
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .expect("look up the relay leader")
}

/// A configuration for the scenario's stream and prefix with another database URL
/// (through a proxy, say) and NATS URL.
pub fn config_via(
    env: &TestEnv,
    database_url: &str,
    nats_url: &str,
) -> edupulse_events::ConfigBuilder {
    edupulse_events::Config::builder(database_url)
        .nats_url(nats_url)
        .subject_prefix(&env.prefix)
        .stream(&env.stream)
        .source("edupulse-faults")
        .relay(suite_relay())
        .max_connections(6)
        .connect_timeout(Duration::from_secs(2))
}

/// The host and port part of a URL (`scheme://user@host:port/path`) and where it
/// starts and ends in `url`.
fn authority(url: &str) -> (usize, usize) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let host_start = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    (host_start, end)
}

fn resolve(host_port: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("{host_port} does not resolve to host:port"))
}

/// The address of the scenario's Postgres server, for a proxy in front of it.
///
/// # Panics
/// If the database URL has no `host:port` that resolves.
pub fn postgres_addr(env: &TestEnv) -> std::net::SocketAddr {
    let (start, end) = authority(&env.database_url);
    let host_port = &env.database_url[start..end];
    if host_port.contains(':') {
        resolve(host_port)
    } else {
        resolve(&format!("{host_port}:5432"))
    }
}

/// `env`'s database URL with its host and port replaced by `addr` (a proxy's).
pub fn database_url_via(env: &TestEnv, addr: std::net::SocketAddr) -> String {
    let (start, end) = authority(&env.database_url);
    format!(
        "{}{addr}{}",
        &env.database_url[..start],
        &env.database_url[end..]
    )
}

/// The environment of a child process for this scenario.
pub fn child_env(env: &TestEnv, nats_url: &str, source: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", env.database_url.clone()),
        ("NATS_URL", nats_url.to_owned()),
        ("EDUPULSE_SUBJECT_PREFIX", env.prefix.clone()),
        ("EDUPULSE_STREAM", env.stream.clone()),
        ("EDUPULSE_SOURCE", source.to_owned()),
    ]
}

/// The shared NATS server's address (`EDUPULSE_TEST_NATS_URL`, default
/// 127.0.0.1:4222), for a proxy in front of it.
///
/// # Panics
/// If the URL has no `host:port` that resolves.
pub fn shared_nats_addr() -> std::net::SocketAddr {
    let url = edupulse_events_tests::shared_nats_url();
    let (start, end) = authority(&url);
    resolve(&url[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_is_found() {
        let url = "postgres://postgres@127.0.0.1:5432/db?x=1";
        let (start, end) = authority(url);
        assert_eq!(&url[start..end], "127.0.0.1:5432");
        let url = "nats://127.0.0.1:4222";
        let (start, end) = authority(url);
        assert_eq!(&url[start..end], "127.0.0.1:4222");
    }
}
