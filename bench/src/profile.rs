//! `--only profile`: where the relay's time goes, with plain timers.
//!
//! The relay's loop is reproduced here with the library's own statements (fence, lock
//! holders, batch read, mark) and the same message headers and chain, once in the
//! library's order (each step waits for the one before) and once with reading and
//! marking overlapped with publishing. Not part of the default run: it explains the
//! relay figure, it is not a figure of the framework.

use crate::raw;
use crate::Figure;
use async_nats::jetstream;
use bytes::Bytes;
use sqlx::{Connection, PgConnection, Row};
use std::time::{Duration, Instant};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

// The relay's statements, as in edupulse-events/src/relay.rs.
const FENCE: &str = "SELECT last_value FROM edupulse.outbox_seq_seq";
const HOLDERS: &str = "\
SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}')
FROM pg_locks
WHERE locktype = 'relation'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND relation = 'edupulse.outbox'::regclass
  AND mode = 'RowExclusiveLock'
  AND pid IS DISTINCT FROM pg_backend_pid()";
const READ_BATCH: &str = "\
SELECT seq, id, name, version, subject, payload::text AS payload, source, correlation_id,
       causation_id, traceparent, occurred_at, attempts, next_attempt_at
FROM edupulse.outbox
WHERE status = 'pending' AND seq <= $1 AND seq > $3
ORDER BY seq
LIMIT $2";
const MARK: &str = "\
UPDATE edupulse.outbox
SET status = 'published', published_at = now(), attempts = attempts + 1
WHERE seq = ANY($1)";

struct Row2 {
    seq: i64,
    id: Uuid,
    subject: String,
    payload: String,
}

/// Time spent in each step of the loop.
#[derive(Default, Debug)]
pub struct Phases {
    fence: Duration,
    read: Duration,
    send: Duration,
    acks: Duration,
    mark: Duration,
    batches: u32,
}

async fn read(conn: &mut PgConnection, after: i64, batch: i64) -> Result<Vec<Row2>, Error> {
    let rows = sqlx::query(READ_BATCH)
        .bind(i64::MAX)
        .bind(batch)
        .bind(after)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Row2 {
                seq: r.try_get("seq")?,
                id: r.try_get("id")?,
                subject: r.try_get("subject")?,
                payload: r.try_get("payload")?,
            })
        })
        .collect()
}

/// Sends a batch with the relay's chain header; returns the ack futures.
async fn send(
    js: &jetstream::Context,
    prefix: &str,
    name: &str,
    rows: &[Row2],
) -> Result<Vec<jetstream::context::PublishAckFuture>, Error> {
    let mut acks = Vec::with_capacity(rows.len());
    let mut previous: Option<String> = None;
    for row in rows {
        let mut headers = raw::headers(row.id, name, "edupulse-bench", &row.subject);
        if let Some(p) = &previous {
            headers.insert("Nats-Expected-Last-Msg-Id", p.as_str());
        }
        acks.push(
            js.publish_with_headers(
                format!("{prefix}.{}", row.subject),
                headers,
                Bytes::from(row.payload.clone()),
            )
            .await?,
        );
        previous = Some(row.id.to_string());
    }
    Ok(acks)
}

async fn await_acks(acks: Vec<jetstream::context::PublishAckFuture>) -> Result<(), Error> {
    for r in
        futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
    {
        r?;
    }
    Ok(())
}

async fn mark(conn: &mut PgConnection, seqs: &[i64]) -> Result<(), Error> {
    sqlx::query(MARK).bind(seqs).execute(&mut *conn).await?;
    Ok(())
}

/// The library's order: fence and holders, read, send, await acks, mark; one after
/// the other. Returns the seconds taken and the time per step.
pub async fn sequential(
    url: &str,
    js: &jetstream::Context,
    prefix: &str,
    name: &str,
    n: usize,
    batch: i64,
) -> Result<(f64, Phases), Error> {
    let mut conn = PgConnection::connect(url).await?;
    let mut p = Phases::default();
    let started = Instant::now();
    let mut done = 0usize;
    let mut after = 0i64;
    while done < n {
        let t = Instant::now();
        let _fence: i64 = sqlx::query_scalar(FENCE).fetch_one(&mut conn).await?;
        let _holders: Vec<String> = sqlx::query_scalar(HOLDERS).fetch_one(&mut conn).await?;
        p.fence += t.elapsed();
        let t = Instant::now();
        let rows = read(&mut conn, after, batch).await?;
        p.read += t.elapsed();
        if rows.is_empty() {
            return Err(format!("profile: outbox ran dry after {done} of {n}").into());
        }
        let t = Instant::now();
        let acks = send(js, prefix, name, &rows).await?;
        p.send += t.elapsed();
        let t = Instant::now();
        await_acks(acks).await?;
        p.acks += t.elapsed();
        let t = Instant::now();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        mark(&mut conn, &seqs).await?;
        p.mark += t.elapsed();
        after = *seqs.last().unwrap_or(&after);
        done += rows.len();
        p.batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = conn.close().await;
    Ok((secs, p))
}

/// Reading the next batch while the acks of this one arrive, and marking the previous
/// batch while this one is sent; still one leader connection, still in order (a batch
/// is marked only after all its acks; the chain header orders the stream).
pub async fn overlapped(
    url: &str,
    js: &jetstream::Context,
    prefix: &str,
    name: &str,
    n: usize,
    batch: i64,
) -> Result<f64, Error> {
    let mut conn = PgConnection::connect(url).await?;
    let started = Instant::now();
    let mut done = 0usize;
    let _fence: i64 = sqlx::query_scalar(FENCE).fetch_one(&mut conn).await?;
    let mut rows = read(&mut conn, 0, batch).await?;
    let mut to_mark: Vec<i64> = Vec::new();
    while !rows.is_empty() {
        // Send this batch while the previous one is marked.
        let (sent, marked) = tokio::join!(send(js, prefix, name, &rows), async {
            if to_mark.is_empty() {
                Ok(())
            } else {
                mark(&mut conn, &to_mark).await
            }
        });
        marked?;
        let acks = sent?;
        let after = rows.last().map(|r| r.seq).unwrap_or(0);
        // Read the next batch while this one's acks arrive.
        let (acked, next) = tokio::join!(await_acks(acks), async {
            let _fence: i64 = sqlx::query_scalar(FENCE).fetch_one(&mut conn).await?;
            let _holders: Vec<String> = sqlx::query_scalar(HOLDERS).fetch_one(&mut conn).await?;
            read(&mut conn, after, batch).await
        });
        acked?;
        to_mark = rows.iter().map(|r| r.seq).collect();
        done += rows.len();
        rows = next?;
    }
    if !to_mark.is_empty() {
        mark(&mut conn, &to_mark).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = conn.close().await;
    if done < n {
        return Err(format!("profile: outbox ran dry after {done} of {n}").into());
    }
    Ok(secs)
}

/// Figures of the profile: the sequential loop's time per step, the overlapped loop.
pub fn figures(
    n: usize,
    batch: i64,
    seq_secs: f64,
    phases: &Phases,
    overlapped_secs: f64,
    pipelined_rate: f64,
) -> Vec<Figure> {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(phases.batches.max(1));
    let mut figures = vec![
        Figure {
            name: format!("profile: relay loop as the library does it, batch {batch}"),
            value: n as f64 / seq_secs,
            unit: "events/s",
            baseline: Some(pipelined_rate),
            ratio_meaning: "rate / raw pipelined publish rate",
            ratio: Some(n as f64 / seq_secs / pipelined_rate),
        },
        Figure {
            name: format!("profile: relay loop overlapped, batch {batch}"),
            value: n as f64 / overlapped_secs,
            unit: "events/s",
            baseline: Some(pipelined_rate),
            ratio_meaning: "rate / raw pipelined publish rate",
            ratio: Some(n as f64 / overlapped_secs / pipelined_rate),
        },
    ];
    for (step, d) in [
        ("fence + lock holders", phases.fence),
        ("read batch", phases.read),
        ("send batch", phases.send),
        ("await acks", phases.acks),
        ("mark batch", phases.mark),
    ] {
        figures.push(Figure {
            name: format!("profile: per batch of {batch}: {step}"),
            value: per(d),
            unit: "µs/batch",
            baseline: None,
            ratio_meaning: "share of the loop",
            ratio: Some(d.as_secs_f64() / seq_secs),
        });
    }
    figures
}

const STILL_HOLDING: &str = "\
SELECT count(*)
FROM pg_locks
WHERE locktype = 'relation'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND relation = 'edupulse.outbox'::regclass
  AND (virtualtransaction = ANY($1) OR pid IS NULL)";

/// While `writers` emit at a steady rate, does what the relay does before each batch
/// (read the lock holders, then poll until they have ended, backing off from 0.5 ms
/// to 20 ms), back to back; returns how long each such fence wait took, sorted, and
/// how many of them found a writer in flight.
pub async fn fence_waits(
    url: &str,
    writers: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<(Vec<Duration>, usize), Error> {
    let mut conn = PgConnection::connect(url).await?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sampler = async {
        let mut waits = Vec::new();
        let mut busy = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            let holders: Vec<String> = sqlx::query_scalar(HOLDERS).fetch_one(&mut conn).await?;
            if !holders.is_empty() {
                busy += 1;
                let mut pause = Duration::from_micros(500);
                loop {
                    let still: i64 = sqlx::query_scalar(STILL_HOLDING)
                        .bind(&holders)
                        .fetch_one(&mut conn)
                        .await?;
                    if still == 0 {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
            waits.push(t.elapsed());
            // About one batch read and publish between two fences.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<_, Error>((waits, busy))
    };
    let (written, sampled) = tokio::join!(
        async {
            let r = writers.await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        },
        sampler
    );
    written?;
    let (mut waits, busy) = sampled?;
    waits.sort();
    let _ = conn.close().await;
    Ok((waits, busy))
}
