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
/// `jetstream { limits { batch { ... } } }`). A server configured lower refuses a
/// larger batch with its limit, which the relay then keeps to.
pub(super) const CHUNK: usize = 1_000;

/// The server's code for a batch over its limit ("atomic publish batch is too large:
/// 100").
const TOO_LARGE: u64 = 10199;

/// The server's codes for refusals that say atomic batches do not work on this stream
/// now: not enabled (10174), a sequence header missing (10175), a header not supported
/// (10177), an id not valid (10179), over the limit without saying it (10199). Not
/// "incomplete" (10176): a connection that died in the middle of a chunk, or a message
/// the stream refuses, leaves that.
const NOT_HERE: [u64; 5] = [10174, 10175, 10177, 10179, TOO_LARGE];

/// What publishing a batch in atomic chunks gave.
#[derive(Debug, Default)]
pub(super) struct AtomicPublished {
    /// One result per row, as [`publish`] gives them.
    pub published: Published,
    /// How many chunks the stream stored as atomic batches, in the part of the batch
    /// that went through (what is marked).
    pub committed: u64,
    /// Why atomic batches do not work on this stream now, when a refusal said so.
    pub setback: Option<String>,
    /// The server's limit on a batch, when it refused a chunk as over it.
    pub limit: Option<usize>,
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
    Refused {
        why: String,
        setback: bool,
        limit: Option<usize>,
    },
    /// Acknowledged, but not as the batch that was sent (another sequence, batch or
    /// count): a server that does not know atomic batches stores their messages one by
    /// one. Not taken as published; atomic batches are set aside.
    Unverified(String),
}

/// One chunk as sent: its rows, its batch id, and the sequence its last event must
/// get.
struct Chunk {
    rows: Range<usize>,
    id: String,
    last: u64,
}

/// What a commit's answer means for `chunk`.
fn judge(chunk: &Chunk, answer: Result<PublishAck, PublishError>) -> Commit {
    use std::error::Error as _;
    let error = match answer {
        Ok(ack) => {
            let count = chunk.rows.len() as u64;
            return if ack.sequence == chunk.last
                && ack.batch_id.as_deref() == Some(chunk.id.as_str())
                && ack.batch_size == Some(count)
            {
                Commit::Stored(ack.sequence)
            } else {
                Commit::Unverified(format!(
                    "JetStream acknowledged an atomic batch of {count} ending at sequence {} \
                     as batch {:?} of {:?} at sequence {}: the server does not store atomic \
                     batches",
                    chunk.last, ack.batch_id, ack.batch_size, ack.sequence
                ))
            };
        }
        Err(error) => error,
    };
    if error.kind() == PublishErrorKind::Other {
        let api = error
            .source()
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
        if let Some(api) = api.filter(|api| api.code() == 400) {
            let code = api.error_code().0;
            let limit = (code == TOO_LARGE)
                .then(|| api.to_string())
                // "atomic publish batch is too large: 100 (code 400, error code 10199)"
                .and_then(|text| {
                    let description = text.split(" (code ").next()?;
                    description.rsplit(':').next()?.trim().parse::<usize>().ok()
                })
                .filter(|limit| *limit > 0);
            return Commit::Refused {
                why: error.to_string(),
                setback: limit.is_none() && NOT_HERE.contains(&code),
                limit,
            };
        }
    }
    match classify(&error) {
        // Only a message can be refused for good, never a whole chunk: the pipelined
        // path finds which.
        Failure::Permanent(why) => Commit::Refused {
            why,
            setback: false,
            limit: None,
        },
        failure => Commit::Failed(failure),
    }
}

/// How sending one chunk went.
enum Sending {
    /// Sent whole; its commit's answer to come.
    Sent(PublishAckFuture),
    /// The client refused a message (it always will: too large, say): the pipelined
    /// path sends the chunk, and says why.
    Refused,
    /// The client could not take a message within `ack_timeout` (NATS is out of
    /// reach): the chunk and the rest of the batch wait.
    Stuck(String),
}

/// Publishes `batch` after `tail` in atomic chunks of up to `chunk_size` events, all
/// chunks sent before their answers are awaited (together). A chunk the server refuses
/// as a batch, and every chunk after it, is published the pipelined way, while every
/// chunk before went in and none after did; so is the rest of the batch when the
/// client refuses a message.
pub(super) async fn publish_atomic(
    inner: &Inner,
    batch: &mut [OutboxRow],
    tail: &Tail,
    chunk_size: usize,
    sent_count: &AtomicU64,
) -> AtomicPublished {
    let chunk_size = chunk_size.max(1);
    let mut chunks = Vec::with_capacity(batch.len().div_ceil(chunk_size));
    let mut commits = Vec::with_capacity(chunks.capacity());
    let mut last = tail.sequence();
    let mut start = 0;
    let mut stuck = None;
    while start < batch.len() {
        let rows = start..(start + chunk_size).min(batch.len());
        let id = Uuid::now_v7().simple().to_string();
        match send_chunk(inner, &batch[rows.clone()], &id, last, sent_count).await {
            Sending::Sent(commit) => {
                last += rows.len() as u64;
                start = rows.end;
                chunks.push(Chunk { rows, id, last });
                commits.push(commit);
            }
            Sending::Refused => break,
            Sending::Stuck(why) => {
                stuck = Some(why);
                break;
            }
        }
    }
    // Together: each answer's wait starts when it is awaited.
    let answers = futures::future::join_all(
        commits
            .into_iter()
            .map(std::future::IntoFuture::into_future),
    )
    .await;
    let commits: Vec<Commit> = chunks
        .iter()
        .zip(answers)
        .map(|(chunk, answer)| judge(chunk, answer))
        .collect();
    let mut result = AtomicPublished::default();
    let outcome = &mut result.published.outcome;
    let mut stored_through = None;
    // Where the pipelined path takes over: a chunk refused as a batch with every chunk
    // before it stored and none after (were one stored, the refused one would be
    // behind it), or the chunk the client refused.
    let mut fallback_from = (stuck.is_none() && start < batch.len()).then_some(start);
    for (i, (chunk, commit)) in chunks.iter().zip(&commits).enumerate() {
        let clean = outcome.iter().all(Result::is_ok);
        let rows = chunk.rows.clone();
        match commit {
            Commit::Stored(sequence) => {
                if clean {
                    result.committed += 1;
                    stored_through = Some(*sequence);
                }
                outcome.extend(rows.map(|_| Ok(())));
            }
            Commit::Failed(failure) => outcome.extend(rows.map(|_| Err(failure.clone()))),
            Commit::Refused {
                why,
                setback,
                limit,
            } => {
                if *setback {
                    result.setback = Some(why.clone());
                }
                result.limit = result.limit.or(*limit);
                let none_after = commits[i + 1..]
                    .iter()
                    .all(|later| !matches!(later, Commit::Stored(_)));
                if clean && none_after {
                    fallback_from = Some(rows.start);
                    break;
                }
                outcome.extend(rows.map(|_| Err(Failure::Transient(why.clone()))));
            }
            Commit::Unverified(why) => {
                result.setback = Some(why.clone());
                outcome.extend(rows.map(|_| Err(Failure::Transient(why.clone()))));
            }
        }
    }
    if let Some(why) = stuck {
        // The client is not taking messages: nothing after this is sent now.
        let from = outcome.len();
        outcome.extend((from..batch.len()).map(|_| Err(Failure::Transient(why.clone()))));
    }
    // Only while every chunk before went in: after one that failed, publishing the
    // rest could put it ahead of the failed one.
    let clean = outcome.iter().all(Result::is_ok);
    let mut last_sequence = stored_through;
    match fallback_from {
        Some(from) if clean && outcome.len() == from => {
            // By sequence: the chunk before is stored at consecutive sequences, ending
            // at its ack's.
            let after = match stored_through {
                Some(sequence) if from > 0 => Tail::Sequence(sequence),
                _ => tail.clone(),
            };
            let rest = publish(inner, &mut batch[from..], &after, sent_count).await;
            result.published.outcome.extend(rest.outcome);
            last_sequence = rest.last_sequence;
        }
        _ => {}
    }
    if result.published.whole(batch) {
        result.published.last_sequence = last_sequence;
    }
    result
}

/// Sends one chunk as the atomic batch `id`, its first message expecting the stream's
/// last sequence to be `after`.
async fn send_chunk(
    inner: &Inner,
    rows: &[OutboxRow],
    id: &str,
    after: u64,
    sent_count: &AtomicU64,
) -> Sending {
    let Some(last) = rows.len().checked_sub(1) else {
        return Sending::Refused;
    };
    let id = HeaderValue::from(id);
    let limit = inner.config.relay.ack_timeout;
    for (i, row) in rows.iter().enumerate() {
        let Ok(mut headers) = row.envelope().header_map() else {
            return Sending::Refused;
        };
        headers.insert("Nats-Batch-Id", id.clone());
        headers.insert("Nats-Batch-Sequence", HeaderValue::from(i + 1));
        if i == 0 {
            headers.insert(NATS_EXPECTED_LAST_SEQUENCE, HeaderValue::from(after));
        }
        let subject = full_subject(inner, row);
        // Copied, not taken: a refused chunk is sent again the pipelined way.
        let payload = Bytes::copy_from_slice(row.payload.as_bytes());
        if i == last {
            headers.insert("Nats-Batch-Commit", "1");
            // Bounded by the context's timeout (`ack_timeout`).
            return match inner
                .jetstream
                .publish_with_headers(subject, headers, payload)
                .await
            {
                Ok(commit) => {
                    sent_count.fetch_add(1, Ordering::Relaxed);
                    Sending::Sent(commit)
                }
                Err(error) if error.kind() == PublishErrorKind::TimedOut => {
                    Sending::Stuck(error.to_string())
                }
                Err(_) => Sending::Refused,
            };
        }
        // No reply: only the commit is answered. Sent on the same connection as the
        // commit, so it reaches the server first. The client takes it at once unless
        // its queue is full (NATS out of reach): bounded like the commit.
        let sending = inner.nats.publish_with_headers(subject, headers, payload);
        match tokio::time::timeout(limit, sending).await {
            Ok(Ok(())) => {
                sent_count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(_)) => return Sending::Refused,
            Err(_) => {
                return Sending::Stuck(format!(
                    "the NATS client took no message for {limit:?}: NATS is out of reach"
                ))
            }
        }
    }
    Sending::Refused
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's code for a batch refused because it holds a message whose
    /// `Nats-Msg-Id` the stream has seen: an event already published.
    const DUPLICATE: u64 = 10201;

    fn api_error(code: u16, err_code: u64, description: &str) -> PublishError {
        let api: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": code, "err_code": err_code, "description": description
        }))
        .expect("a JetStream API error");
        PublishError::with_source(PublishErrorKind::Other, api)
    }

    fn chunk() -> Chunk {
        Chunk {
            rows: 10..20,
            id: "b1".into(),
            last: 42,
        }
    }

    fn ack(sequence: u64, batch: Option<&str>, count: Option<u64>) -> PublishAck {
        serde_json::from_value(serde_json::json!({
            "stream": "S", "seq": sequence, "batch": batch, "count": count
        }))
        .expect("an ack")
    }

    #[test]
    fn a_chunk_is_stored_only_when_the_ack_names_its_batch_count_and_last_sequence() {
        assert_eq!(
            judge(&chunk(), Ok(ack(42, Some("b1"), Some(10)))),
            Commit::Stored(42)
        );
        // A server that does not know atomic batches stored the messages one by one
        // and acks the commit as a plain message; or the ack is another batch's.
        for wrong in [
            ack(42, None, None),
            ack(41, Some("b1"), Some(10)),
            ack(42, Some("b2"), Some(10)),
            ack(42, Some("b1"), Some(9)),
        ] {
            assert!(matches!(judge(&chunk(), Ok(wrong)), Commit::Unverified(_)));
        }
    }

    #[test]
    fn refusals_go_the_pipelined_way_and_only_some_set_atomic_batches_aside() {
        let refused =
            |err_code, description| judge(&chunk(), Err(api_error(400, err_code, description)));
        // Events the stream already has, after a relay died before marking.
        assert!(matches!(
            refused(
                DUPLICATE,
                "atomic publish batch contains duplicate message id"
            ),
            Commit::Refused {
                setback: false,
                limit: None,
                ..
            }
        ));
        // A gap: the connection died in the middle of the chunk, or a message in it was
        // too large for the stream.
        assert!(matches!(
            refused(10176, "atomic publish batch is incomplete"),
            Commit::Refused { setback: false, .. }
        ));
        // A message the stream refuses (the commit, too large for it).
        assert!(matches!(
            refused(10054, "message size exceeds maximum allowed"),
            Commit::Refused { setback: false, .. }
        ));
        // The server's limit, kept to from then on.
        assert!(matches!(
            refused(TOO_LARGE, "atomic publish batch is too large: 100"),
            Commit::Refused {
                setback: false,
                limit: Some(100),
                ..
            }
        ));
        assert!(matches!(
            refused(TOO_LARGE, "atomic publish batch is too large"),
            Commit::Refused {
                setback: true,
                limit: None,
                ..
            }
        ));
        for (code, description) in [
            (10174, "atomic publish is disabled"),
            (
                10177,
                "atomic publish unsupported header used: Nats-Expected-Last-Msg-Id",
            ),
        ] {
            assert!(
                matches!(
                    refused(code, description),
                    Commit::Refused { setback: true, .. }
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn a_broken_chain_and_what_may_pass_hold_for_every_event_of_the_chunk() {
        let out_of_chain = api_error(400, 10071, "wrong last sequence: 5");
        let out_of_chain =
            PublishError::with_source(PublishErrorKind::WrongLastSequence, out_of_chain);
        assert!(matches!(
            judge(&chunk(), Err(out_of_chain)),
            Commit::Failed(Failure::OutOfChain(_))
        ));
        for error in [
            PublishError::new(PublishErrorKind::TimedOut),
            PublishError::new(PublishErrorKind::StreamNotFound),
            api_error(503, 10008, "JetStream system temporarily unavailable"),
        ] {
            assert!(
                matches!(
                    judge(&chunk(), Err(error)),
                    Commit::Failed(Failure::Transient(_))
                ),
                "transient"
            );
        }
        // Never a whole chunk dead at once.
        assert!(matches!(
            judge(
                &chunk(),
                Err(PublishError::new(PublishErrorKind::MaxPayloadExceeded))
            ),
            Commit::Refused { .. }
        ));
    }
}
