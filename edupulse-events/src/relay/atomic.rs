//! Publishing a batch as JetStream atomic batches (nats-server 2.12 and later, on a
//! stream that allows them): each chunk of up to [`CHUNK`] events is stored whole or
//! not at all, and answered with one acknowledgement, so a replicated stream takes it
//! in one round of its quorum instead of one round per event.
//!
//! **The chain.** A batch cannot name its predecessor by id (the server refuses
//! `Nats-Expected-Last-Msg-Id` in a batch), so the first message of each chunk names
//! the stream sequence it must follow (`Nats-Expected-Last-Sequence`). The chunk before
//! ends at exactly that sequence, because a batch is stored at consecutive sequences.
//! A chunk whose predecessor did not go in is refused (`OutOfChain`), as a pipelined
//! event is. Within a chunk the server keeps the order: it refuses a batch with a gap
//! in its `Nats-Batch-Sequence`, which is what a connection dying in the middle of a
//! chunk leaves.
//!
//! **What a batch cannot do, the pipelined path does.** A batch that holds an event the
//! stream has already (a relay died before marking) is refused whole, and so is one
//! with a message the stream refuses (too large, say). Then that chunk and the rest of
//! the batch are published the pipelined way ([`publish`]), which acknowledges
//! duplicates and judges each event alone.

use super::publish::{classify, full_subject, publish, Failure, Published, Tail};
use super::read::OutboxRow;
use crate::service::Inner;
use async_nats::header::NATS_EXPECTED_LAST_SEQUENCE;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::HeaderValue;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// Most events in one atomic batch: the server's default limit (`max_msgs` under
/// `jetstream { limits { batch { ... } } }`). A server configured lower refuses the
/// relay's batches; it then publishes the pipelined way for a while.
pub(super) const CHUNK: usize = 1_000;

/// The server's code for a batch refused because it holds a message whose
/// `Nats-Msg-Id` the stream has seen: an event already published.
const DUPLICATE: u64 = 10201;

/// The server's codes for refusals that say atomic batches do not work on this stream
/// now: not enabled (10174), a sequence missing (10175), incomplete (10176, also when
/// a batch is over the server's limit), a header not supported (10177), an id not
/// valid (10179), too large (10199).
const NOT_HERE: [u64; 6] = [10174, 10175, 10176, 10177, 10179, 10199];

/// What publishing a batch in atomic chunks gave.
#[derive(Debug, Default)]
pub(super) struct AtomicPublished {
    /// One result per row, as [`publish`] gives them.
    pub published: Published,
    /// How many chunks the stream stored as atomic batches.
    pub committed: u64,
    /// Why atomic batches do not work on this stream now, when a refusal said so.
    pub setback: Option<String>,
}

/// How the server answered one chunk's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Commit {
    /// Stored whole; the last event is at this sequence.
    Stored(u64),
    /// Not stored, and the failure holds for each of its events: it went out of its
    /// chain, or may go through later.
    Failed(Failure),
    /// Refused as a batch: its events are published the pipelined way, which judges
    /// each. `setback`: the refusal says atomic batches do not work here now.
    Refused { why: String, setback: bool },
}

/// What a commit's answer means for the chunk.
fn judge(answer: Result<PublishAck, PublishError>) -> Commit {
    use std::error::Error as _;
    let error = match answer {
        Ok(ack) => return Commit::Stored(ack.sequence),
        Err(error) => error,
    };
    let refused = |setback| Commit::Refused {
        why: error.to_string(),
        setback,
    };
    if error.kind() == PublishErrorKind::Other {
        let api = error
            .source()
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
        if let Some(api) = api.filter(|api| api.code() == 400) {
            let code = api.error_code().0;
            return refused(code != DUPLICATE && NOT_HERE.contains(&code));
        }
    }
    match classify(&error) {
        // Only a message can be refused for good, never a whole chunk: the pipelined
        // path finds which.
        Failure::Permanent(_) => refused(false),
        failure => Commit::Failed(failure),
    }
}

/// One chunk on its way: its rows, and its commit's answer to come.
struct Sent {
    rows: Range<usize>,
    commit: PublishAckFuture,
}

/// Publishes `batch` after `tail` in atomic chunks of up to [`CHUNK`] events, all
/// chunks sent before the first answer is awaited. A chunk the server refuses as a
/// batch, and every chunk after it, is published the pipelined way; so is the rest of
/// the batch when a chunk cannot be sent whole.
pub(super) async fn publish_atomic(
    inner: &Inner,
    batch: &mut [OutboxRow],
    tail: &Tail,
    sent_count: &AtomicU64,
) -> AtomicPublished {
    let mut sent = Vec::with_capacity(batch.len().div_ceil(CHUNK));
    let mut expected = tail.sequence();
    let mut start = 0;
    while start < batch.len() {
        let rows = start..(start + CHUNK).min(batch.len());
        match send_chunk(inner, &batch[rows.clone()], expected, sent_count).await {
            Some(commit) => {
                expected += rows.len() as u64;
                start = rows.end;
                sent.push(Sent { rows, commit });
            }
            // Not sent whole: the server abandons what it got of it; the pipelined
            // path sends it and tells why it could not be sent.
            None => break,
        }
    }
    let mut result = AtomicPublished::default();
    let outcome = &mut result.published.outcome;
    let mut last = None;
    let mut fallback_from = (start < batch.len()).then_some(start);
    for Sent { rows, commit } in sent {
        let commit = judge(commit.await);
        let clean = outcome.iter().all(Result::is_ok);
        match commit {
            Commit::Stored(sequence) => {
                result.committed += 1;
                last = Some(sequence);
                outcome.extend(rows.map(|_| Ok(())));
            }
            Commit::Failed(failure) => outcome.extend(rows.map(|_| Err(failure.clone()))),
            Commit::Refused { why, setback } if clean => {
                if setback {
                    result.setback = Some(why);
                }
                fallback_from = Some(rows.start);
                break;
            }
            // An earlier chunk failed: the batch stops there anyway.
            Commit::Refused { why, .. } => {
                outcome.extend(rows.map(|_| Err(Failure::Transient(why.clone()))));
            }
        }
    }
    // Only while every chunk before went in: after one that failed, publishing the
    // rest could put it ahead of the failed one.
    let clean = outcome.iter().all(Result::is_ok);
    match fallback_from {
        Some(from) if clean && outcome.len() == from => {
            // By sequence: the chunk before is stored at consecutive sequences, ending
            // at its ack's.
            let after = match last {
                Some(sequence) if from > 0 => Tail::Sequence(sequence),
                _ => tail.clone(),
            };
            let rest = publish(inner, &mut batch[from..], &after, sent_count).await;
            result.published.outcome.extend(rest.outcome);
            last = rest.last_sequence;
        }
        _ => {}
    }
    if result.published.whole(batch) {
        result.published.last_sequence = last;
    }
    result
}

/// Sends one chunk as an atomic batch, its first message expecting the stream's last
/// sequence to be `expected`; returns its commit's answer to come, or `None` when a
/// message could not be sent (the client refused it, or is closed).
async fn send_chunk(
    inner: &Inner,
    rows: &[OutboxRow],
    expected: u64,
    sent_count: &AtomicU64,
) -> Option<PublishAckFuture> {
    let id = HeaderValue::from(Uuid::now_v7().simple().to_string());
    let last = rows.len().checked_sub(1)?;
    for (i, row) in rows.iter().enumerate() {
        let mut headers = row.envelope().header_map().ok()?;
        headers.insert("Nats-Batch-Id", id.clone());
        headers.insert("Nats-Batch-Sequence", HeaderValue::from(i + 1));
        if i == 0 {
            headers.insert(NATS_EXPECTED_LAST_SEQUENCE, HeaderValue::from(expected));
        }
        let subject = full_subject(inner, row);
        // Copied, not taken: a refused chunk is sent again the pipelined way.
        let payload = Bytes::copy_from_slice(row.payload.as_bytes());
        if i == last {
            headers.insert("Nats-Batch-Commit", "1");
            let commit = inner
                .jetstream
                .publish_with_headers(subject, headers, payload)
                .await
                .ok()?;
            sent_count.fetch_add(1, Ordering::Relaxed);
            return Some(commit);
        }
        // No reply: only the commit is answered. Sent on the same connection as the
        // commit, so it reaches the server first.
        inner
            .nats
            .publish_with_headers(subject, headers, payload)
            .await
            .ok()?;
        sent_count.fetch_add(1, Ordering::Relaxed);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, err_code: u64) -> PublishError {
        let api: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": code, "err_code": err_code, "description": "refused"
        }))
        .expect("a JetStream API error");
        PublishError::with_source(PublishErrorKind::Other, api)
    }

    fn ack(sequence: u64) -> PublishAck {
        serde_json::from_value(serde_json::json!({"stream": "S", "seq": sequence}))
            .expect("an ack")
    }

    #[test]
    fn a_stored_chunk_ends_at_its_acks_sequence() {
        assert_eq!(judge(Ok(ack(42))), Commit::Stored(42));
    }

    #[test]
    fn a_duplicate_is_refused_without_a_setback_and_atomic_limits_with_one() {
        assert!(matches!(
            judge(Err(api_error(400, DUPLICATE))),
            Commit::Refused { setback: false, .. }
        ));
        for code in NOT_HERE {
            assert!(
                matches!(
                    judge(Err(api_error(400, code))),
                    Commit::Refused { setback: true, .. }
                ),
                "{code}"
            );
        }
        // A message the stream refuses (too large for it, say): the pipelined path
        // finds which, and atomic batches go on.
        assert!(matches!(
            judge(Err(api_error(400, 10054))),
            Commit::Refused { setback: false, .. }
        ));
    }

    #[test]
    fn a_broken_chain_and_what_may_pass_hold_for_every_event_of_the_chunk() {
        let out_of_chain = PublishError::new(PublishErrorKind::WrongLastSequence);
        assert!(matches!(
            judge(Err(out_of_chain)),
            Commit::Failed(Failure::OutOfChain(_))
        ));
        for error in [
            PublishError::new(PublishErrorKind::TimedOut),
            PublishError::new(PublishErrorKind::StreamNotFound),
            api_error(503, 10008),
        ] {
            assert!(
                matches!(judge(Err(error)), Commit::Failed(Failure::Transient(_))),
                "transient"
            );
        }
        // Never a whole chunk dead at once.
        assert!(matches!(
            judge(Err(PublishError::new(PublishErrorKind::MaxPayloadExceeded))),
            Commit::Refused { .. }
        ));
    }
}
