//! Messages the group can never be handed. A message whose headers no client can parse
//! makes async-nats drop its connection when it arrives, so the consumer never sees
//! it, cannot ack or terminate it, and JetStream delivers it again after every
//! `ack_wait`. The durable consumer therefore has a server-side bound,
//! `max_redeliveries`: past it JetStream stops and publishes an advisory, and the
//! instance that receives it (one per group: a queue subscription) reads the message
//! raw from the stream (base64, unparsed) and records it as a dead letter,
//! [`DeadReason::Undeliverable`].
//!
//! That bound costs `max_redeliveries` times `ack_wait`, and the events that arrived
//! in the same pull after such a message are lost with the connection each time, so
//! they would come back with it and be given up with it. So whenever an instance's
//! connection comes back, it also [`scan`]s what the group has been delivered and not
//! acked, reads each message raw, and records and terminates at once every one whose
//! headers the client cannot parse (see [`client_can_parse`]); the events around it
//! then come back after one `ack_wait`, in order (the fetch loop catches up, see
//! `Gate`).

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

/// How many stream sequences a [`scan`] reads at most: the newest the group was
/// delivered above its ack floor (a message that just dropped the connection is among
/// them, however far behind the floor is); an older unreadable message waits for
/// `max_redeliveries`.
const SCAN_LIMIT: u64 = 4096;

/// How many messages a [`scan`] reads at once.
const SCAN_CONCURRENCY: usize = 16;

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
                Ok(advisory) => {
                    let sequence = advisory.stream_seq;
                    match fetch(&client, &stream, sequence).await {
                        Ok(raw) => {
                            let why = format!(
                                "JetStream delivered it {} times without an ack \
                                 (max_redeliveries): the client could not read it, as with \
                                 headers no client can parse",
                                advisory.deliveries
                            );
                            record(&ctx, sequence, advisory.deliveries, &why, &raw).await;
                        }
                        Err(why) => {
                            tracing::error!(
                                group = %ctx.group, sequence, error = %why,
                                "a message was delivered too often without an ack and cannot \
                                 be read back; it stays in the stream at this sequence"
                            );
                            ctx.stats.dead_letters_lost.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                Err(error) => tracing::debug!(%error, "unreadable max-deliveries advisory"),
            }
        }
    }))
}

/// Whether async-nats can read a header block as it arrives in a message: its parser's
/// rules, with its own checks of names and status codes. A block it cannot read drops
/// the connection it arrives on (a value with a lone carriage return would even panic
/// its reader, so that is refused here too).
pub(super) fn client_can_parse(block: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(block) else {
        return false;
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next().and_then(|line| line.strip_prefix("NATS/1.0")) else {
        return false;
    };
    let version = version.trim();
    let status = version.split_once(' ').map_or(version, |(s, _)| s.trim());
    if !status.is_empty() && status.parse::<async_nats::StatusCode>().is_err() {
        return false;
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        if name.parse::<async_nats::HeaderName>().is_err() || value.contains('\r') {
            return false;
        }
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            if more.contains('\r') {
                return false;
            }
        }
    }
    true
}

/// What a [`scan`] did.
pub(super) struct Scanned {
    /// How many unreadable messages it found.
    pub found: usize,
    /// Every sequence up to this one has been read and judged (a stored message never
    /// changes, so the next scan starts above it).
    pub through: u64,
}

/// After the instance's connection came back: reads the messages the group was
/// delivered above its ack floor (the newest [`SCAN_LIMIT`], and only those above
/// `judged`, which an earlier scan read) raw from the stream, and records and
/// terminates those the client cannot read.
pub(super) async fn scan(ctx: &Ctx, floor: u64, delivered: u64, judged: u64) -> Scanned {
    let stream = ctx.inner.config.stream.as_str();
    let first = scan_from(floor, delivered).max(judged.saturating_add(1));
    // The first sequence that could not be read: judged through the one before it.
    let mut failed: Option<u64> = None;
    let unreadable: Vec<(u64, Raw)> = futures::stream::iter(first..=delivered)
        .map(|sequence| async move { (sequence, fetch(&ctx.nats, stream, sequence).await) })
        .buffered(SCAN_CONCURRENCY)
        .filter_map(|(sequence, raw)| {
            let kept = match raw {
                Ok(raw) if !raw.1.is_empty() && !client_can_parse(&raw.1) => Some((sequence, raw)),
                Ok(_) => None,
                Err(why) => {
                    tracing::debug!(sequence, error = %why, "cannot read a message back");
                    failed.get_or_insert(sequence);
                    None
                }
            };
            std::future::ready(kept)
        })
        .collect()
        .await;
    let through = failed.map_or(delivered.max(judged), |sequence| sequence - 1);
    let prefix = format!("{}.", ctx.inner.config.subject_prefix);
    for (sequence, raw) in &unreadable {
        let relative = raw.0.strip_prefix(&prefix).unwrap_or(&raw.0);
        if !ctx.routes.covers(relative) {
            continue;
        }
        let why = "its headers cannot be parsed by the client, which dropped the connection it \
                   arrived on; found when the connection came back";
        record(ctx, *sequence, 1, why, raw).await;
        terminate(ctx, *sequence).await;
    }
    Scanned {
        found: unreadable.len(),
        through,
    }
}

/// The first stream sequence a [`scan`] reads: above the ack `floor`, and at most
/// [`SCAN_LIMIT`] below the last `delivered`.
fn scan_from(floor: u64, delivered: u64) -> u64 {
    floor
        .saturating_add(1)
        .max(delivered.saturating_sub(SCAN_LIMIT - 1))
}

/// Tells JetStream never to deliver the message at `sequence` to the group again: the
/// `+TERM` its own delivery's reply subject would carry, to that subject (JetStream
/// finds the pending message by its stream sequence).
async fn terminate(ctx: &Ctx, sequence: u64) {
    let subject = format!(
        "$JS.ACK.{}.{}.1.{sequence}.1.0.0",
        ctx.inner.config.stream, ctx.group
    );
    if let Err(error) = ctx.nats.publish(subject, "+TERM".into()).await {
        tracing::warn!(%error, sequence, "could not terminate an unreadable message");
    }
}

/// A stored message: its subject, header block and body.
type Raw = (String, Vec<u8>, Vec<u8>);

/// Records the raw message at `sequence` as an undeliverable dead letter, once (a
/// message found by a scan and then by the advisory is recorded once).
async fn record(ctx: &Ctx, sequence: u64, deliveries: u64, why: &str, raw: &Raw) {
    let (subject, raw_headers, payload) = raw;
    let text = String::from_utf8_lossy(raw_headers);
    let header = |name: &str| {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
    };
    let event_id = header("ce-id").and_then(|id| id.parse::<Uuid>().ok());
    let event_name = header("ce-type");
    let readable = readable_headers(raw_headers);
    let row = Row {
        reason: DeadReason::Undeliverable,
        why,
        event_id,
        event_name: event_name.as_deref(),
        subject,
        sequence,
        deliveries: u32::try_from(deliveries).unwrap_or(u32::MAX),
        headers: &readable,
        payload,
        raw_headers,
    };
    for attempt in 1..=WRITE_TRIES {
        match insert(ctx, &row).await {
            Ok(()) => {
                ctx.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
                ctx.metrics.dead_letter(DeadReason::Undeliverable.as_str());
                tracing::error!(
                    group = %ctx.group, subject = %subject, sequence = sequence,
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
                    %error, group = %ctx.group, sequence = sequence,
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
async fn fetch(client: &async_nats::Client, stream: &str, sequence: u64) -> Result<Raw, String> {
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
    fn a_scan_reads_the_newest_deliveries_above_the_floor() {
        assert_eq!(scan_from(10, 20), 11);
        assert_eq!(scan_from(0, SCAN_LIMIT), 1);
        assert_eq!(scan_from(0, SCAN_LIMIT + 1), 2);
        assert_eq!(scan_from(5, 100_000), 100_001 - SCAN_LIMIT);
        // Nothing above the floor: an empty range.
        assert!(scan_from(20, 20) > 20);
    }

    #[test]
    fn header_blocks_are_judged_by_the_clients_rules() {
        for good in [
            "NATS/1.0\r\n\r\n",
            "NATS/1.0\r\nce-id: 1\r\nx:\r\n\r\n",
            "NATS/1.0 503\r\n\r\n",
            "NATS/1.0 408 Request Timeout\r\n\r\n",
            "NATS/1.0\r\nlong: a\r\n  folded\r\n\r\n",
            "NATS/1.0\r\nce-source: caf\u{e9}\r\n\r\n",
        ] {
            assert!(client_can_parse(good.as_bytes()), "{good:?}");
        }
        for bad in [
            &b"NATS/1.0\r\nBad Name: x\r\n\r\n"[..],
            b"NATS/1.0\r\nno colon here\r\n\r\n",
            "NATS/1.0\r\nN\u{e4}me: x\r\n\r\n".as_bytes(),
            b"NATS/1.0\r\nx: a\rb\r\n\r\n",
            b"NATS/1.0\r\nx: a\r\n \rb\r\n\r\n",
            b"NATS/1.0\r\nx: \xff\r\n\r\n",
            b"NATS/1.0 abc\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"",
        ] {
            assert!(!client_can_parse(bad), "{:?}", String::from_utf8_lossy(bad));
        }
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
