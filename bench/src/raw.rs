//! The raw baselines: the same work done with sqlx and async-nats alone.

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// One outbox row as the raw code writes it.
pub struct RawRow {
    pub id: Uuid,
    pub subject: String,
    pub payload: String,
    pub occurred_at: OffsetDateTime,
}

/// One row, as a raw writer inserts it.
fn insert_row<'q>(
    name: &'q str,
    source: &'q str,
    row: &'q RawRow,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(
        "INSERT INTO edupulse.outbox
            (id, name, version, subject, payload, source, correlation_id, causation_id, traceparent, occurred_at)
         VALUES ($1, $2, $3, $4, CAST($5::text AS jsonb), $6, $7, NULL, NULL, $8)",
    )
    .bind(row.id)
    .bind(name)
    .bind(1_i32)
    .bind(&row.subject)
    .bind(&row.payload)
    .bind(source)
    .bind(row.id)
    .bind(row.occurred_at)
}

/// Inserts one row in its own transaction (`BEGIN`, the insert, `COMMIT`), as a
/// hand-written outbox would.
pub async fn insert_one(
    pool: &PgPool,
    name: &str,
    source: &str,
    row: &RawRow,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    insert_row(name, source, row).execute(&mut *tx).await?;
    tx.commit().await
}

/// Inserts one row in one statement, its own transaction (autocommit).
pub async fn insert_one_autocommit(
    pool: &PgPool,
    name: &str,
    source: &str,
    row: &RawRow,
) -> Result<(), sqlx::Error> {
    insert_row(name, source, row).execute(pool).await?;
    Ok(())
}

/// Inserts rows in one multi-row statement in one transaction.
pub async fn insert_many(
    pool: &PgPool,
    name: &str,
    source: &str,
    rows: &[RawRow],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO edupulse.outbox
            (id, name, version, subject, payload, source, correlation_id, occurred_at)
         SELECT u.id, $5, 1, u.subject, CAST(u.payload AS jsonb), $6, u.id, u.occurred_at
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
              AS u(id, subject, payload, occurred_at)",
    )
    .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
    .bind(name)
    .bind(source)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The headers the relay sends, built by hand.
pub fn headers(id: Uuid, name: &str, source: &str, subject: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let id = id.to_string();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id.as_str());
    h.insert("ce-type", name);
    h.insert("ce-source", source);
    h.insert("ce-time", "2026-11-27T12:00:00.123456Z");
    h.insert("ce-eventversion", "1");
    h.insert("ce-subject", subject);
    h.insert("ce-datacontenttype", "application/json");
    h.insert("Content-Type", "application/json");
    h.insert("Nats-Msg-Id", id.as_str());
    h.insert("ce-correlationid", id.as_str());
    h
}

/// Chains `messages` as the relay does: each after the first names the one before it
/// as the stream's expected last message (`Nats-Expected-Last-Msg-Id`).
pub fn chain(messages: &mut [RawMessage]) {
    let mut previous: Option<String> = None;
    for message in messages {
        if let Some(previous) = &previous {
            message
                .headers
                .insert("Nats-Expected-Last-Msg-Id", previous.as_str());
        }
        previous = message
            .headers
            .get("Nats-Msg-Id")
            .map(|id| id.as_str().to_owned());
    }
}

/// A message ready to publish.
pub struct RawMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Most acks the raw pipelined publisher keeps in flight.
///
/// async-nats lets a JetStream context hold at most 5,000 unawaited publish acks (its
/// `max_ack_inflight`); a publish beyond that waits for a permit that only an awaited
/// (or dropped) ack future gives back. Holding every ack future of a 10,000-message run
/// and awaiting them at the end therefore never finishes: that was the benchmark's
/// hang. The window stays below the client's limit and above the relay's largest batch
/// (4,000), so the baseline is the best the client does, not a handicapped one.
pub const PIPELINE_WINDOW: usize = 4_000;

/// Publishes every message with up to [`PIPELINE_WINDOW`] acks in flight; returns when
/// every ack has arrived. `progress` is bumped per ack.
pub async fn publish_pipelined(
    js: &jetstream::Context,
    messages: Vec<RawMessage>,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use std::sync::atomic::Ordering;
    type AckFuture = <jetstream::context::PublishAckFuture as std::future::IntoFuture>::IntoFuture;
    let mut in_flight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    for m in messages {
        if in_flight.len() >= PIPELINE_WINDOW {
            if let Some(result) = in_flight.next().await {
                result.map_err(|e| e.to_string())?;
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ack = js
            .publish_with_headers(m.subject, m.headers, m.payload)
            .await
            .map_err(|e| e.to_string())?;
        in_flight.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(result) = in_flight.next().await {
        result.map_err(|e| e.to_string())?;
        progress.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Publishes one message at a time, waiting for each ack. `progress` is bumped per ack.
pub async fn publish_sequential(
    js: &jetstream::Context,
    messages: Vec<RawMessage>,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    for m in messages {
        js.publish_with_headers(m.subject, m.headers, m.payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// Publishes every message in atomic batches of `batch` (nats-server 2.12 and later, on
/// a stream with `allow_atomic`): each message carries `Nats-Batch-Id` and
/// `Nats-Batch-Sequence`, the last of a batch `Nats-Batch-Commit: 1` and a reply
/// subject; only the commit is acknowledged, for the whole batch, which is stored at
/// once or not at all. Up to `in_flight` batches await their commit ack at a time.
/// `progress` is bumped per message acknowledged.
pub async fn publish_atomic(
    client: &async_nats::Client,
    messages: Vec<RawMessage>,
    batch: usize,
    in_flight: usize,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use std::sync::atomic::Ordering;
    let commit = |answer: Result<async_nats::Message, async_nats::RequestError>, n: usize| {
        let answer = answer.map_err(|e| format!("batch commit: {e}"))?;
        let ack: serde_json::Value = serde_json::from_slice(&answer.payload)
            .map_err(|e| format!("batch commit answer: {e}"))?;
        if ack.get("error").is_some() {
            return Err(format!("batch refused: {ack}"));
        }
        progress.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    };
    let mut pending = FuturesUnordered::new();
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let id = Uuid::now_v7().simple().to_string();
        let chunk: Vec<RawMessage> = messages.by_ref().take(batch).collect();
        let n = chunk.len();
        let mut commit_request = None;
        for (i, mut m) in chunk.into_iter().enumerate() {
            m.headers.insert("Nats-Batch-Id", id.as_str());
            m.headers
                .insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if i + 1 == n {
                m.headers.insert("Nats-Batch-Commit", "1");
                commit_request = Some(m);
            } else {
                client
                    .publish_with_headers(m.subject, m.headers, m.payload)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        if let Some(m) = commit_request {
            let client = client.clone();
            pending.push(async move {
                let answer = client
                    .request_with_headers(m.subject, m.headers, m.payload)
                    .await;
                (answer, n)
            });
        }
        if pending.len() >= in_flight {
            if let Some((answer, n)) = pending.next().await {
                commit(answer, n)?;
            }
        }
    }
    while let Some((answer, n)) = pending.next().await {
        commit(answer, n)?;
    }
    Ok(())
}
