//! Messages the group can never be handed. A message whose headers no client can parse
//! makes async-nats drop its connection when it arrives, so the consumer never sees
//! it, cannot ack or terminate it, and JetStream delivers it again after every
//! `ack_wait`. The durable consumer therefore has a server-side bound,
//! `max_redeliveries`: past it JetStream stops and publishes an advisory, and the
//! instance that receives it (one per group: a queue subscription) reads the message
//! raw from the stream (base64, unparsed) and records it as a dead letter,
//! [`DeadReason::Undeliverable`].

use super::context::Ctx;
use super::dead_letter::{insert, readable_headers, DeadReason, Row};
use crate::support::pg::is_unavailable;
use crate::support::retry::backoff;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures::StreamExt;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How many times a write of the record is tried before it is given up (logged).
const WRITE_TRIES: u32 = 5;

/// JetStream's advisory: a message of the group reached `max_deliver`.
#[derive(Debug, Deserialize)]
struct Advisory {
    stream_seq: u64,
    deliveries: u64,
}

/// JetStream's answer to a message request (`$JS.API.STREAM.MSG.GET`).
#[derive(Debug, Deserialize)]
struct Stored {
    message: Option<StoredMessage>,
}

/// A stored message: its headers and body in base64, as the server keeps them.
#[derive(Debug, Deserialize)]
struct StoredMessage {
    subject: String,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

/// The advisory subject for `group` on `stream`.
fn advisory_subject(stream: &str, group: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{group}")
}

/// Listens for the group's max-deliveries advisories until aborted.
pub(super) async fn spawn_listener(
    ctx: Arc<Ctx>,
    client: async_nats::Client,
) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
    let stream = ctx.inner.config.stream.clone();
    let mut advisories = client
        .queue_subscribe(
            advisory_subject(&stream, &ctx.group),
            format!("edupulse-{}", ctx.group),
        )
        .await?;
    Ok(tokio::spawn(async move {
        while let Some(message) = advisories.next().await {
            match serde_json::from_slice::<Advisory>(&message.payload) {
                Ok(advisory) => record(&ctx, &client, &stream, &advisory).await,
                Err(error) => tracing::debug!(%error, "unreadable max-deliveries advisory"),
            }
        }
    }))
}

/// Reads the message raw and records it as a dead letter.
async fn record(ctx: &Ctx, client: &async_nats::Client, stream: &str, advisory: &Advisory) {
    let (subject, raw_headers, payload) = match fetch(client, stream, advisory.stream_seq).await {
        Ok(found) => found,
        Err(why) => {
            tracing::error!(
                group = %ctx.group, sequence = advisory.stream_seq, error = %why,
                "a message was delivered too often without an ack and cannot be read back; \
                 it stays in the stream at this sequence"
            );
            ctx.stats.dead_letters_lost.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let text = String::from_utf8_lossy(&raw_headers);
    let header = |name: &str| {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
    };
    let event_id = header("ce-id").and_then(|id| id.parse::<Uuid>().ok());
    let event_name = header("ce-type");
    let why = format!(
        "JetStream delivered it {} times without an ack (max_redeliveries): the client could \
         not read it, as with headers no client can parse",
        advisory.deliveries
    );
    let readable = readable_headers(&raw_headers);
    let row = Row {
        reason: DeadReason::Undeliverable,
        why: &why,
        event_id,
        event_name: event_name.as_deref(),
        subject: &subject,
        sequence: advisory.stream_seq,
        deliveries: u32::try_from(advisory.deliveries).unwrap_or(u32::MAX),
        headers: &readable,
        payload: &payload,
        raw_headers: &raw_headers,
    };
    for attempt in 1..=WRITE_TRIES {
        match insert(ctx, &row).await {
            Ok(()) => {
                ctx.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    group = %ctx.group, subject = %subject, sequence = advisory.stream_seq,
                    "an undeliverable message moved to the dead-letter table"
                );
                return;
            }
            Err(error) if attempt < WRITE_TRIES && is_unavailable(&error) => {
                let delay = backoff(
                    ctx.settings.retry_base,
                    ctx.settings.retry_max,
                    i32::try_from(attempt).unwrap_or(i32::MAX),
                );
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                tracing::error!(
                    %error, group = %ctx.group, sequence = advisory.stream_seq,
                    "cannot record an undeliverable message; it stays in the stream at this \
                     sequence"
                );
                ctx.stats.dead_letters_lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// The stored message at `sequence`: subject, header block and body, as bytes.
async fn fetch(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
) -> Result<(String, Vec<u8>, Vec<u8>), String> {
    let request = serde_json::json!({ "seq": sequence }).to_string();
    let answer = client
        .request(format!("$JS.API.STREAM.MSG.GET.{stream}"), request.into())
        .await
        .map_err(|e| format!("the stream did not answer: {e}"))?;
    let stored: Stored = serde_json::from_slice(&answer.payload)
        .map_err(|e| format!("the stream's answer does not read: {e}"))?;
    let message = stored
        .message
        .ok_or_else(|| "the stream no longer holds it".to_owned())?;
    let decode = |field: Option<String>| {
        field
            .map(|text| STANDARD.decode(text))
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(|e| format!("the stored message is not base64: {e}"))
    };
    Ok((
        message.subject,
        decode(message.hdrs)?,
        decode(message.data)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advisory_subject_names_the_stream_and_the_group() {
        assert_eq!(
            advisory_subject("EDUPULSE", "grading"),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.EDUPULSE.grading"
        );
        let advisory: Advisory = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","stream":"S","consumer":"g","stream_seq":42,"deliveries":5}"#,
        )
        .unwrap();
        assert_eq!((advisory.stream_seq, advisory.deliveries), (42, 5));
    }

    #[test]
    fn a_header_block_reads_as_text_whatever_it_holds() {
        let readable =
            readable_headers(b"NATS/1.0\r\nBad Name: x\r\nno colon\r\nce-id: 1\0\r\n\r\n");
        assert_eq!(readable["Bad Name"], "x");
        assert_eq!(readable["no colon"], "");
        assert_eq!(readable["ce-id"], "1\u{FFFD}");
    }
}
