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

/// Inserts one row in its own transaction, as a hand-written outbox would.
pub async fn insert_one(
    pool: &PgPool,
    name: &str,
    source: &str,
    row: &RawRow,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
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
    .execute(&mut *tx)
    .await?;
    tx.commit().await
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
    h.insert("Content-Type", "application/json");
    h.insert("Nats-Msg-Id", id.as_str());
    h.insert("ce-correlationid", id.as_str());
    h
}

/// A message ready to publish.
pub struct RawMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Publishes every message with all acks in flight (bounded by the client's window);
/// returns when every ack has arrived.
pub async fn publish_pipelined(
    js: &jetstream::Context,
    messages: Vec<RawMessage>,
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let ack = js
            .publish_with_headers(m.subject, m.headers, m.payload)
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    for result in
        futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
    {
        result.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Publishes one message at a time, waiting for each ack.
pub async fn publish_sequential(
    js: &jetstream::Context,
    messages: Vec<RawMessage>,
) -> Result<(), String> {
    for m in messages {
        js.publish_with_headers(m.subject, m.headers, m.payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
