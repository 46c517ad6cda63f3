//! The measured stages, each framework figure beside its raw baseline.

use crate::raw::{self, RawMessage, RawRow};
use crate::{percentile_ms, Figure, Scale};
use async_nats::jetstream::{self, consumer::pull, AckKind};
use bytes::Bytes;
use edupulse_events::{
    Config, ConsumerSettings, DomainEvent, EventService, Received, RelaySettings,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The benchmark's event: a typical small domain event.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "bench.quiz.submitted", subject = "quiz.{quiz_id}.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: u32,
    pub student_id: Uuid,
    pub score: f32,
    pub seq: u64,
}

fn event(seq: u64) -> QuizSubmitted {
    QuizSubmitted {
        quiz_id: (seq % 64) as u32,
        student_id: Uuid::now_v7(),
        score: 0.87,
        seq,
    }
}

fn raw_row(seq: u64) -> Result<RawRow, Error> {
    let e = event(seq);
    Ok(RawRow {
        id: Uuid::now_v7(),
        subject: e.subject()?,
        payload: serde_json::to_string(&e)?,
        occurred_at: time::OffsetDateTime::now_utc(),
    })
}

const SOURCE: &str = "edupulse-bench";

fn admin_url() -> String {
    std::env::var("EDUPULSE_BENCH_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// The bench's own database, stream and prefix; removed by `cleanup`.
struct Env {
    db: String,
    url: String,
    prefix: String,
    stream: String,
}

impl Env {
    async fn create() -> Result<Env, Error> {
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let db = format!("edupulse_bench_{id}");
        let mut admin = sqlx::PgConnection::connect(&admin_url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut admin)
            .await?;
        let base = admin_url();
        let cut = base.rfind('/').ok_or("admin URL has no database")?;
        Ok(Env {
            url: format!("{}/{db}", &base[..cut]),
            db,
            prefix: format!("bench{id}"),
            stream: format!("BENCH_{}", id.to_uppercase()),
        })
    }

    fn config(&self) -> edupulse_events::ConfigBuilder {
        Config::builder(&self.url)
            .nats_url(nats_url())
            .subject_prefix(&self.prefix)
            .stream(&self.stream)
            .source(SOURCE)
            .max_connections(20)
    }

    async fn service(&self, notify: bool, relay: RelaySettings) -> Result<EventService, Error> {
        let service =
            EventService::connect(self.config().notify(notify).relay(relay).build()?).await?;
        service.migrate().await?;
        Ok(service)
    }

    async fn cleanup(&self, js: &jetstream::Context) {
        let _ = js.delete_stream(&self.stream).await;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

async fn truncate(pool: &PgPool) -> Result<(), Error> {
    sqlx::query("TRUNCATE edupulse.outbox")
        .execute(pool)
        .await?;
    Ok(())
}

async fn pending(pool: &PgPool) -> Result<i64, Error> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM edupulse.outbox WHERE status = 'pending'")
            .fetch_one(pool)
            .await?,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs every stage (or the one named by `--only`).
pub async fn run_all(scale: Scale, only: Option<String>) -> Result<Vec<Figure>, Error> {
    let env = Env::create().await?;
    let client = async_nats::connect(nats_url()).await?;
    let js = jetstream::new(client);
    let result = run_stages(&env, &js, scale, only).await;
    env.cleanup(&js).await;
    result
}

async fn run_stages(
    env: &Env,
    js: &jetstream::Context,
    scale: Scale,
    only: Option<String>,
) -> Result<Vec<Figure>, Error> {
    let wants = |stage: &str| only.as_deref().is_none_or(|o| o == stage);
    let mut figures = Vec::new();
    let with_notify = env.service(true, RelaySettings::default()).await?;
    let without_notify = env.service(false, RelaySettings::default()).await?;
    if wants("emit") {
        eprintln!("emit ...");
        figures.extend(emit(&with_notify, &without_notify, scale).await?);
    }
    if wants("batch") {
        eprintln!("batch emit ...");
        figures.extend(batch(&with_notify, scale).await?);
    }
    if wants("relay") {
        eprintln!("relay ...");
        figures.extend(relay(env, js, scale).await?);
    }
    if wants("e2e") {
        eprintln!("end to end ...");
        figures.extend(end_to_end(env, js, scale).await?);
    }
    if wants("consume") {
        eprintln!("consume ...");
        figures.extend(consume(env, js, scale).await?);
    }
    if wants("memory") {
        eprintln!("memory ...");
        figures.extend(memory(env, scale).await?);
    }
    Ok(figures)
}

/// Time per event of `writers` tasks each doing `per_writer` single-event transactions.
async fn time_writers<F, Fut>(writers: usize, per_writer: usize, work: F) -> Result<Duration, Error>
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let work = work.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    work((w * per_writer + i) as u64).await?;
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

async fn emit(
    notify: &EventService,
    quiet: &EventService,
    scale: Scale,
) -> Result<Vec<Figure>, Error> {
    let mut figures = Vec::new();
    for writers in [1usize, 8] {
        let per_writer = scale.emits / writers;
        let n = (per_writer * writers) as f64;
        let (mut raw_t, mut ours_t, mut quiet_t) = (Vec::new(), Vec::new(), Vec::new());
        for _round in 0..3 {
            truncate(notify.pool()).await?;
            let pool = notify.pool().clone();
            let t = time_writers(writers, per_writer, move |seq| {
                let pool = pool.clone();
                async move {
                    let row = raw_row(seq)?;
                    raw::insert_one(&pool, QuizSubmitted::NAME, SOURCE, &row).await?;
                    Ok(())
                }
            })
            .await?;
            raw_t.push(t.as_secs_f64() / n);

            for (service, out) in [(notify, &mut ours_t), (quiet, &mut quiet_t)] {
                truncate(service.pool()).await?;
                let s = service.clone();
                let t = time_writers(writers, per_writer, move |seq| {
                    let s = s.clone();
                    async move {
                        let mut tx = s.pool().begin().await?;
                        s.emit_in(&mut tx, event(seq)).await?;
                        tx.commit().await?;
                        Ok(())
                    }
                })
                .await?;
                out.push(t.as_secs_f64() / n);
            }
        }
        let (raw_s, ours_s, quiet_s) = (median(raw_t), median(ours_t), median(quiet_t));
        figures.push(Figure {
            name: format!("emit_in, {writers} writer(s), with notify: time per event"),
            value: ours_s * 1e6,
            unit: "µs/event",
            baseline: Some(raw_s * 1e6),
            ratio_meaning: "edupulse time / raw insert time (target ≤ 1.10)",
            ratio: Some(ours_s / raw_s),
        });
        figures.push(Figure {
            name: format!("emit_in, {writers} writer(s), with notify: throughput"),
            value: 1.0 / ours_s,
            unit: "events/s",
            baseline: Some(1.0 / raw_s),
            ratio_meaning: "edupulse rate / raw rate",
            ratio: Some(raw_s / ours_s),
        });
        figures.push(Figure {
            name: format!("emit_in, {writers} writer(s), no notify: time per event"),
            value: quiet_s * 1e6,
            unit: "µs/event",
            baseline: Some(raw_s * 1e6),
            ratio_meaning: "edupulse time / raw insert time",
            ratio: Some(quiet_s / raw_s),
        });
    }
    truncate(notify.pool()).await?;
    Ok(figures)
}

async fn batch(service: &EventService, scale: Scale) -> Result<Vec<Figure>, Error> {
    let (mut raw_t, mut ours_t) = (Vec::new(), Vec::new());
    for round in 0..scale.batches {
        let base = (round * 500) as u64;
        let rows: Vec<RawRow> = (0..500)
            .map(|i| raw_row(base + i))
            .collect::<Result<_, _>>()?;
        let events: Vec<QuizSubmitted> = (0..500).map(|i| event(base + i)).collect();
        let started = Instant::now();
        raw::insert_many(service.pool(), QuizSubmitted::NAME, SOURCE, &rows).await?;
        raw_t.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut tx = service.pool().begin().await?;
        service.emit_all_in(&mut tx, events).await?;
        tx.commit().await?;
        ours_t.push(started.elapsed().as_secs_f64());
        if round % 10 == 9 {
            truncate(service.pool()).await?;
        }
    }
    truncate(service.pool()).await?;
    let (raw_s, ours_s) = (median(raw_t), median(ours_t));
    Ok(vec![Figure {
        name: "emit_all of 500: throughput".into(),
        value: 500.0 / ours_s,
        unit: "events/s",
        baseline: Some(500.0 / raw_s),
        ratio_meaning: "edupulse rate / raw multi-row insert rate (target ≥ 0.8)",
        ratio: Some(raw_s / ours_s),
    }])
}

async fn prefill(service: &EventService, n: usize) -> Result<(), Error> {
    let mut seq = 0u64;
    while (seq as usize) < n {
        let chunk = 5_000.min(n - seq as usize) as u64;
        service.emit_all((seq..seq + chunk).map(event)).await?;
        seq += chunk;
    }
    Ok(())
}

fn raw_messages(prefix: &str, tag: &str, n: usize) -> Result<Vec<RawMessage>, Error> {
    (0..n as u64)
        .map(|seq| {
            let e = event(seq);
            let id = Uuid::now_v7();
            let subject = e.subject()?;
            Ok(RawMessage {
                headers: raw::headers(id, QuizSubmitted::NAME, SOURCE, &subject),
                subject: format!("{prefix}.{tag}.{subject}"),
                payload: Bytes::from(serde_json::to_vec(&e)?),
            })
        })
        .collect()
}

async fn relay(env: &Env, js: &jetstream::Context, scale: Scale) -> Result<Vec<Figure>, Error> {
    let service = env.service(true, RelaySettings::default()).await?;
    truncate(service.pool()).await?;
    prefill(&service, scale.relay_events).await?;
    let started = Instant::now();
    let relay = service.start_relay();
    while pending(service.pool()).await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ours = started.elapsed().as_secs_f64();
    relay.shutdown().await?;
    truncate(service.pool()).await?;

    let messages = raw_messages(&env.prefix, "rawpipe", scale.relay_events)?;
    let started = Instant::now();
    raw::publish_pipelined(js, messages).await?;
    let pipelined = started.elapsed().as_secs_f64();

    let messages = raw_messages(&env.prefix, "rawseq", scale.sequential_publishes)?;
    let started = Instant::now();
    raw::publish_sequential(js, messages).await?;
    let sequential = started.elapsed().as_secs_f64();

    let n = scale.relay_events as f64;
    let ours_rate = n / ours;
    let pipe_rate = n / pipelined;
    let seq_rate = scale.sequential_publishes as f64 / sequential;
    Ok(vec![
        Figure {
            name: format!(
                "relay drain of {} (acked and marked) vs raw pipelined",
                scale.relay_events
            ),
            value: ours_rate,
            unit: "events/s",
            baseline: Some(pipe_rate),
            ratio_meaning: "edupulse rate / raw pipelined publish rate (target ≥ 0.7)",
            ratio: Some(ours_rate / pipe_rate),
        },
        Figure {
            name: "relay drain vs raw publish awaiting each ack".into(),
            value: ours_rate,
            unit: "events/s",
            baseline: Some(seq_rate),
            ratio_meaning: "edupulse rate / raw one-ack-at-a-time rate",
            ratio: Some(ours_rate / seq_rate),
        },
    ])
}

/// Latencies of one steady run, sorted.
async fn steady_run(
    service: &EventService,
    group: &str,
    rate: u64,
    seconds: u64,
) -> Result<(Vec<Duration>, f64), Error> {
    let total = rate * seconds;
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total as usize]));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(AtomicU64::new(0));
    let base = Uuid::now_v7().as_u128() as u64 & 0xffff_ffff;
    let (s2, l2, h2) = (sent.clone(), latencies.clone(), handled.clone());
    let consumer = service
        .consumer(group)
        .settings(ConsumerSettings {
            start_from: edupulse_events::StartFrom::New,
            ..ConsumerSettings::default()
        })
        .on::<QuizSubmitted, _, _>(move |r: Received<QuizSubmitted>| {
            let (sent, latencies, handled) = (s2.clone(), l2.clone(), h2.clone());
            async move {
                let now = Instant::now();
                let index = r.event.seq.wrapping_sub(base) as usize;
                let at = sent
                    .lock()
                    .ok()
                    .and_then(|s| s.get(index).copied().flatten());
                if let (Some(at), Ok(mut l)) = (at, latencies.lock()) {
                    l.push(now - at);
                }
                handled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .start()
        .await?;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticker = tokio::time::interval(period);
    let started = Instant::now();
    let mut writers = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let service = service.clone();
        let sent = sent.clone();
        writers.push(tokio::spawn(async move {
            let mut tx = service.pool().begin().await?;
            service.emit_in(&mut tx, event(base + i)).await?;
            if let Ok(mut s) = sent.lock() {
                s[i as usize] = Some(Instant::now());
            }
            tx.commit().await?;
            Ok::<(), Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let offered_elapsed = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consumer.shutdown().await?;
    let achieved = total as f64 / offered_elapsed;
    let mut l = latencies.lock().map_err(|_| "poisoned")?.clone();
    // The first second warms caches and connections.
    let skip = (rate as usize).min(l.len() / 4);
    l.drain(..skip);
    l.sort();
    if handled.load(Ordering::Relaxed) < total {
        return Err(format!(
            "only {} of {total} events handled",
            handled.load(Ordering::Relaxed)
        )
        .into());
    }
    Ok((l, achieved))
}

async fn raw_pipeline_run(
    env: &Env,
    js: &jetstream::Context,
    rate: u64,
    seconds: u64,
) -> Result<Vec<Duration>, Error> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&env.url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS raw_outbox (seq BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL, payload TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    let subject = format!("{}.rawe2e.x", env.prefix);
    let stream = js.get_stream(&env.stream).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("rawe2e".into()),
            filter_subject: subject.clone(),
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    let total = rate * seconds;
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total as usize]));

    // Raw relay: LISTEN, read new rows, publish pipelined.
    let relay = {
        let (pool, js, subject) = (pool.clone(), js.clone(), subject.clone());
        tokio::spawn(async move {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen("raw_outbox").await?;
            let mut last = 0i64;
            loop {
                listener.recv().await?;
                let rows: Vec<(i64, String)> = sqlx::query_as(
                    "SELECT seq, payload FROM raw_outbox WHERE seq > $1 ORDER BY seq",
                )
                .bind(last)
                .fetch_all(&pool)
                .await?;
                let mut acks = Vec::with_capacity(rows.len());
                for (seq, payload) in rows {
                    last = last.max(seq);
                    acks.push(js.publish(subject.clone(), Bytes::from(payload)).await?);
                }
                for ack in acks {
                    ack.await?;
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        })
    };
    // Raw consumer: pull and ack, measuring.
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let (sent, latencies) = (sent.clone(), latencies.clone());
        tokio::spawn(async move {
            let mut messages = consumer.messages().await?;
            let mut seen = 0;
            while let Some(m) = messages.next().await {
                let m = m?;
                let now = Instant::now();
                let n: usize = std::str::from_utf8(&m.payload)?.parse()?;
                if let Some(at) = sent
                    .lock()
                    .map_err(|_| "poisoned")?
                    .get(n)
                    .copied()
                    .flatten()
                {
                    latencies.lock().map_err(|_| "poisoned")?.push(now - at);
                }
                m.ack_with(AckKind::Ack).await?;
                seen += 1;
                if seen == total {
                    break;
                }
            }
            Ok::<(), Error>(())
        })
    };
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticker = tokio::time::interval(period);
    let mut writers = Vec::new();
    for i in 0..total {
        ticker.tick().await;
        let (pool, sent) = (pool.clone(), sent.clone());
        writers.push(tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO raw_outbox (n, payload) VALUES ($1, $2)")
                .bind(i as i64)
                .bind(i.to_string())
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_notify('raw_outbox', '')")
                .execute(&mut *tx)
                .await?;
            if let Ok(mut s) = sent.lock() {
                s[i as usize] = Some(Instant::now());
            }
            tx.commit().await?;
            Ok::<(), Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    match tokio::time::timeout(Duration::from_secs(30), reader).await {
        Ok(joined) => joined??,
        Err(_) => return Err("the raw pipeline did not deliver every event within 30 s".into()),
    }
    relay.abort();
    let mut l = latencies.lock().map_err(|_| "poisoned")?.clone();
    let skip = (rate as usize).min(l.len() / 4);
    l.drain(..skip);
    l.sort();
    Ok(l)
}

async fn end_to_end(
    env: &Env,
    js: &jetstream::Context,
    scale: Scale,
) -> Result<Vec<Figure>, Error> {
    let service = env.service(true, RelaySettings::default()).await?;
    truncate(service.pool()).await?;
    let relay = service.start_relay();
    let (ours, _) = steady_run(&service, "e2e", 1000, scale.e2e_seconds).await?;
    let raw = raw_pipeline_run(env, js, 1000, scale.e2e_seconds).await?;
    let mut figures = Vec::new();
    for p in [50.0, 95.0, 99.0] {
        let (o, r) = (percentile_ms(&ours, p), percentile_ms(&raw, p));
        figures.push(Figure {
            name: format!("end to end at 1,000 events/s: p{p:.0} commit→handler"),
            value: o,
            unit: "ms",
            baseline: Some(r),
            ratio_meaning: "edupulse latency / raw LISTEN/NOTIFY pipeline latency",
            ratio: Some(o / r),
        });
    }
    // The highest steady rate at which p99 stays under 50 ms.
    let mut best = 0u64;
    for (step, rate) in [1_000u64, 2_000, 3_000, 4_000, 6_000, 8_000]
        .into_iter()
        .enumerate()
    {
        let group = format!("e2e-step{step}");
        match steady_run(&service, &group, rate, scale.step_seconds).await {
            Ok((l, achieved)) => {
                let p99 = percentile_ms(&l, 99.0);
                eprintln!("  {rate} events/s offered, {achieved:.0} achieved, p99 {p99:.2} ms");
                if p99 < 50.0 && achieved >= rate as f64 * 0.9 {
                    best = rate;
                } else {
                    break;
                }
            }
            Err(error) => {
                eprintln!("  {rate} events/s: {error}");
                break;
            }
        }
    }
    relay.shutdown().await?;
    figures.push(Figure {
        name: "highest steady rate with p99 < 50 ms (steps of 1k..8k)".into(),
        value: best as f64,
        unit: "events/s",
        baseline: None,
        ratio_meaning: "-",
        ratio: None,
    });
    truncate(service.pool()).await?;
    Ok(figures)
}

async fn consume(env: &Env, js: &jetstream::Context, scale: Scale) -> Result<Vec<Figure>, Error> {
    let service = env.service(true, RelaySettings::default()).await?;
    // Messages in the framework's format, published straight to the stream.
    let n = scale.consume_events;
    let messages: Vec<RawMessage> = (0..n as u64)
        .map(|seq| {
            let e = event(seq);
            let id = Uuid::now_v7();
            let subject = e.subject()?;
            Ok::<_, Error>(RawMessage {
                headers: raw::headers(id, QuizSubmitted::NAME, SOURCE, &subject),
                subject: format!("{}.{subject}", env.prefix),
                payload: Bytes::from(serde_json::to_vec(&e)?),
            })
        })
        .collect::<Result<_, _>>()?;
    raw::publish_pipelined(js, messages).await?;
    let filter = format!("{}.quiz.*.submitted", env.prefix);

    // Raw: pull and ack.
    let stream = js.get_stream(&env.stream).await?;
    let raw_consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("rawconsume".into()),
            filter_subject: filter.clone(),
            max_ack_pending: 400,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = raw_consumer
        .stream()
        .max_messages_per_batch(100)
        .messages()
        .await?;
    let mut seen = 0;
    while let Some(m) = messages.next().await {
        m?.ack().await?;
        seen += 1;
        if seen == n {
            break;
        }
    }
    let raw_s = started.elapsed().as_secs_f64();
    drop(messages);

    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let started = Instant::now();
    let consumer = service
        .consumer("benchconsume")
        .on::<QuizSubmitted, _, _>(move |_r: Received<QuizSubmitted>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .start()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while handled.load(Ordering::Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ours_s = started.elapsed().as_secs_f64();
    consumer.shutdown().await?;
    Ok(vec![Figure {
        name: format!("consume {n}: handler throughput vs raw pull-and-ack"),
        value: n as f64 / ours_s,
        unit: "events/s",
        baseline: Some(n as f64 / raw_s),
        ratio_meaning: "edupulse rate / raw rate (target ≥ 0.6)",
        ratio: Some(raw_s / ours_s),
    }])
}

async fn memory(env: &Env, scale: Scale) -> Result<Vec<Figure>, Error> {
    let service = env.service(false, RelaySettings::default()).await?;
    truncate(service.pool()).await?;
    let started = Instant::now();
    prefill(&service, scale.memory_events).await?;
    eprintln!(
        "  prefilled {} in {:.1?}",
        scale.memory_events,
        started.elapsed()
    );
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .arg("--relay-child")
        .env("DATABASE_URL", &env.url)
        .env("NATS_URL", nats_url())
        .env("EDUPULSE_SUBJECT_PREFIX", &env.prefix)
        .env("EDUPULSE_STREAM", &env.stream)
        .env("EDUPULSE_SOURCE", SOURCE)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kb="))
        .ok_or_else(|| {
            format!(
                "relay child failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let kb: f64 = line.trim().parse()?;
    let rate = stdout
        .lines()
        .find_map(|l| l.strip_prefix("drain_rate="))
        .and_then(|r| r.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    truncate(service.pool()).await?;
    Ok(vec![
        Figure {
            name: format!("relay peak RSS draining {} pending", scale.memory_events),
            value: kb / 1024.0,
            unit: "MB",
            baseline: None,
            ratio_meaning: "target < 100 MB",
            ratio: None,
        },
        Figure {
            name: format!("relay drain rate over {} pending", scale.memory_events),
            value: rate,
            unit: "events/s",
            baseline: None,
            ratio_meaning: "-",
            ratio: None,
        },
    ])
}

/// The child process of the memory figure: drains the outbox with a relay and prints
/// its peak RSS.
pub fn relay_child() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: Result<(), Error> = runtime.block_on(async {
        let service = EventService::connect(Config::from_env()?).await?;
        let started = Instant::now();
        let n = pending(service.pool()).await?;
        let relay = service.start_relay();
        while pending(service.pool()).await? > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        relay.shutdown().await?;
        println!("drain_rate={}", n as f64 / elapsed);
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("relay child: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
        .unwrap_or_default();
    println!("peak_rss_kb={peak}");
    std::process::ExitCode::SUCCESS
}
