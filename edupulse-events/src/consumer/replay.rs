//! Replaying dead letters: the messages an operator asked to replay
//! ([`Emitter::replay_dead_letters`](crate::Emitter::replay_dead_letters)) are taken by
//! a running instance of their group, one at a time in stream order, rebuilt from what
//! the dead-letter record kept (subject, header block, body) and handed to the group's
//! handler once, as a delivered event would be. The record says how it went: replayed,
//! or still dead with the new error.

use super::context::Ctx;
use super::envelope::{parse, Delivered, Parsed, Via};
use super::handle::{handle, Outcome};
use super::lane::{decode, Decoded};
use crate::causation::Cause;
use crate::support::retry::{backoff, sleep_or_stop};
use crate::support::sql::DEAD_LETTERS;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use const_format::formatcp;
use sqlx::Row;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often an instance looks for replays asked for.
const REPLAY_POLL: Duration = Duration::from_secs(1);

/// Whether the group has a letter to replay: read outside a transaction, so that an
/// instance with nothing to replay (nearly always) opens none.
const ANY_REPLAY: &str = formatcp!(
    "SELECT EXISTS (SELECT 1 FROM {DEAD_LETTERS}
                    WHERE consumer_group = $1 AND replay_requested_at IS NOT NULL)"
);

/// The group's next letter to replay, in stream order, locked against the group's
/// other instances (which skip it).
const NEXT_REPLAY: &str = formatcp!(
    "SELECT id, subject, stream_sequence, raw_headers, headers, payload
     FROM {DEAD_LETTERS}
     WHERE consumer_group = $1 AND replay_requested_at IS NOT NULL
     ORDER BY stream_sequence, id
     LIMIT 1
     FOR UPDATE SKIP LOCKED"
);

/// A replay that went through.
const REPLAYED: &str = formatcp!(
    "UPDATE {DEAD_LETTERS}
     SET replayed_at = pg_catalog.now(), replays = replays + 1, replay_requested_at = NULL
     WHERE id = $1"
);

/// A replay that failed: the letter stays dead, with the new error.
const STILL_DEAD: &str = formatcp!(
    "UPDATE {DEAD_LETTERS}
     SET error = $2, replays = replays + 1, replay_requested_at = NULL
     WHERE id = $1"
);

/// The replayer of an instance: stopped by [`Replayer::stop`], which lets a replay in
/// hand finish (never aborted inside its transaction, which could leave a pooled
/// connection in it).
pub(super) struct Replayer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Replayer {
    /// Starts replaying what is asked for.
    pub fn start(ctx: Arc<Ctx>) -> Replayer {
        let (stop, stopped) = watch::channel(false);
        Replayer {
            stop,
            task: tokio::spawn(run(ctx, stopped)),
        }
    }

    /// Stops it, waiting for a replay in hand up to `limit`.
    pub async fn stop(mut self, limit: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(limit, &mut self.task).await.is_err() {
            tracing::warn!("a replay did not finish within shutdown_timeout; abandoning it");
            self.task.abort();
        }
    }
}

/// Replays what is asked for until told to stop.
async fn run(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut outages = 0;
    while !*stop.borrow() {
        match replay_next(&ctx).await {
            Ok(true) => {
                outages = 0;
                continue;
            }
            Ok(false) => outages = 0,
            Err(error) => {
                outages += 1;
                tracing::debug!(%error, group = %ctx.group, "cannot replay dead letters now; trying later");
            }
        }
        let delay = if outages == 0 {
            REPLAY_POLL
        } else {
            backoff(
                REPLAY_POLL,
                ctx.settings.retry_max.max(REPLAY_POLL),
                outages,
            )
        };
        if sleep_or_stop(&mut stop, delay).await {
            return;
        }
    }
}

/// Replays the group's next letter asked for, if any: true if there was one.
async fn replay_next(ctx: &Ctx) -> Result<bool, sqlx::Error> {
    let asked: bool = sqlx::query_scalar(ANY_REPLAY)
        .bind(&ctx.group)
        .fetch_one(&ctx.inner.pool)
        .await?;
    if !asked {
        return Ok(false);
    }
    let mut tx = ctx.inner.pool.begin().await?;
    let Some(row) = sqlx::query(NEXT_REPLAY)
        .bind(&ctx.group)
        .fetch_optional(&mut *tx)
        .await?
    else {
        tx.commit().await?;
        return Ok(false);
    };
    let id: i64 = row.try_get("id")?;
    let subject: String = row.try_get("subject")?;
    let sequence: i64 = row.try_get("stream_sequence")?;
    let raw: Option<Vec<u8>> = row.try_get("raw_headers")?;
    let readable: serde_json::Value = row.try_get("headers")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let message = async_nats::Message {
        subject: subject.into(),
        reply: None,
        length: payload.len(),
        payload: payload.into(),
        headers: Some(match raw {
            Some(raw) => headers_from_block(&raw),
            None => headers_from_readable(&readable),
        }),
        status: None,
        description: None,
    };
    let outcome = replay(ctx, &message, u64::try_from(sequence).unwrap_or(0)).await;
    match outcome {
        Err(Outcome::Unavailable(why)) => {
            // Not the event's fault: the request stays, for the next round.
            tracing::warn!(group = %ctx.group, id, error = %why, "Postgres is unreachable while replaying a dead letter; retrying");
            tx.rollback().await?;
            return Err(sqlx::Error::Protocol(why));
        }
        Ok(()) => {
            sqlx::query(REPLAYED).bind(id).execute(&mut *tx).await?;
            tracing::info!(group = %ctx.group, id, sequence, "a dead letter was replayed");
        }
        Err(outcome) => {
            let why = match outcome {
                Outcome::Failed(why) | Outcome::Panicked(why) => why,
                _ => "the replay did not go through".to_owned(),
            };
            tracing::warn!(group = %ctx.group, id, sequence, error = %why, "a replayed dead letter failed again; it stays a dead letter");
            sqlx::query(STILL_DEAD)
                .bind(id)
                .bind(super::dead_letter::storable(&why).as_ref())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// Hands the rebuilt message to the group's handler once: `Ok` if it was handled (or
/// its inbox had it already).
async fn replay(ctx: &Ctx, message: &async_nats::Message, sequence: u64) -> Result<(), Outcome> {
    let delivered = Delivered { count: 1, sequence };
    let prefix = &ctx.inner.config.subject_prefix;
    let (route, mut envelope) = match parse(&ctx.routes, &ctx.group, prefix, message, delivered) {
        Parsed::Event(route, envelope) => (route, envelope),
        Parsed::NotOurs => {
            return Err(Outcome::Failed(
                "the group no longer handles this subject".to_owned(),
            ))
        }
        Parsed::Dead(reason, why) => return Err(Outcome::Failed(format!("{reason}: {why}"))),
    };
    let event = match decode(route, envelope.version, &message.payload) {
        Decoded::Event(event) => event,
        Decoded::Refused(why) => return Err(Outcome::Failed(why)),
        Decoded::Panicked(why) => return Err(Outcome::Panicked(why)),
    };
    envelope.via = Via(Some(ctx.inner.emitter.clone()));
    let cause = Cause::of(envelope.id, envelope.correlation_id);
    match cause.scope(handle(ctx, route, event, envelope)).await {
        Outcome::Handled | Outcome::Duplicate => Ok(()),
        other => Err(other),
    }
}

/// A header block as a dead letter kept it (`NATS/1.0` and `Name: value` lines); lines
/// the client would refuse are left out.
fn headers_from_block(block: &[u8]) -> HeaderMap {
    let text = String::from_utf8_lossy(block);
    let mut headers = HeaderMap::new();
    for line in text.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            insert(&mut headers, name.trim(), value.trim());
        }
    }
    headers
}

/// The readable form of the headers (older records without the raw block).
fn headers_from_readable(readable: &serde_json::Value) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(map) = readable.as_object() {
        for (name, value) in map {
            if let Some(value) = value.as_str() {
                insert(&mut headers, name, value);
            }
        }
    }
    headers
}

/// Adds one header, if the client accepts its name and value.
fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (HeaderName::from_str(name), HeaderValue::from_str(value)) {
        headers.append(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_header_block_is_rebuilt_without_what_the_client_refuses() {
        let headers =
            headers_from_block(b"NATS/1.0\r\nce-id: 42\r\nBad Name: x\r\nce-type: a.b\r\n\r\n");
        assert_eq!(headers.get("ce-id").map(|v| v.as_str()), Some("42"));
        assert_eq!(headers.get("ce-type").map(|v| v.as_str()), Some("a.b"));
        assert_eq!(headers.len(), 2, "the line with a bad name is left out");
        let readable = serde_json::json!({"ce-id": "7", "x": 1});
        let headers = headers_from_readable(&readable);
        assert_eq!(headers.get("ce-id").map(|v| v.as_str()), Some("7"));
        assert!(headers.get("x").is_none());
    }
}
