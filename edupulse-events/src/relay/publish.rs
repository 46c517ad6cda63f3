//! Publishing a batch to JetStream in order: the chain of expected predecessors that
//! keeps order across a dying connection, and the classification of what fails.

use super::read::OutboxRow;
use crate::service::Inner;
use async_nats::header::{HeaderName, NATS_EXPECTED_LAST_MESSAGE_ID, NATS_EXPECTED_LAST_SEQUENCE};
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderValue;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// Retrying cannot fix it: the event goes dead.
    Permanent(String),
    /// Retrying may: the event waits and is published again.
    Transient(String),
    /// JetStream refused the event because the event sent before it in the batch is not
    /// the stream's last message (it was lost with a dying connection, or refused). The
    /// event is sent again, at once, as the first of the next batch.
    OutOfChain(String),
}

/// What a failed publish means for the event.
pub(super) fn classify(error: &PublishError) -> Failure {
    use std::error::Error as _;
    let message = error.to_string();
    match error.kind() {
        // Only the relay's own chain sets these expectations.
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Failure::OutOfChain(message)
        }
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent(message),
        PublishErrorKind::Other => {
            let source = error.source();
            // The client refuses the subject before sending it: it always will.
            if source.is_some_and(|s| s.is::<async_nats::SubjectError>()) {
                return Failure::Permanent(message);
            }
            match source.and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>()) {
                // The server refused this message as a bad request (too large for the
                // stream, say): sending it again gets the same answer.
                Some(api) if api.code() == 400 => Failure::Permanent(message),
                _ => Failure::Transient(message),
            }
        }
        _ => Failure::Transient(message),
    }
}

/// What the stream's last message is, as far as this relay knows: the predecessor the
/// first message of the next batch names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tail {
    /// The event with this id (its `Nats-Msg-Id`), at this stream sequence.
    Event { id: Uuid, sequence: u64 },
    /// A message at this stream sequence without an event id, or since removed.
    Sequence(u64),
    /// The stream has never held a message.
    Empty,
}

impl Tail {
    /// The header that makes JetStream store a message only right after this one.
    fn expectation(&self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            Tail::Event { id, .. } => Some(after_event(*id)),
            Tail::Sequence(sequence) => {
                Some((NATS_EXPECTED_LAST_SEQUENCE, HeaderValue::from(*sequence)))
            }
            Tail::Empty => None,
        }
    }

    /// The stream sequence of the last message (0 for a stream that never held one):
    /// what an atomic batch, which cannot name its predecessor by id, expects.
    pub(super) fn sequence(&self) -> u64 {
        match self {
            Tail::Event { sequence, .. } | Tail::Sequence(sequence) => *sequence,
            Tail::Empty => 0,
        }
    }
}

/// The header that makes JetStream store a message only right after the event `id`.
fn after_event(id: Uuid) -> (HeaderName, HeaderValue) {
    (
        NATS_EXPECTED_LAST_MESSAGE_ID,
        HeaderValue::from(id.hyphenated().to_string()),
    )
}

/// The relay cannot read the stream's last message to chain its next batch to it.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {what}: {source}")]
pub(super) struct TailError {
    what: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl TailError {
    fn new(what: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        TailError {
            what,
            source: Box::new(source),
        }
    }
}

/// The stream's last message, as [`read_tail`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TailRead {
    /// What the next batch chains to.
    pub tail: Tail,
    /// Whether that message may be another publisher's: it is not an event as the
    /// relay publishes them (`Nats-Msg-Id` = `ce-id`, a UUID), or it is one from
    /// another source (`ce-source`), whose id the leader then looks for in the outbox.
    pub suspect: Option<Suspect>,
}

/// Why the stream's last message may not be this relay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Suspect {
    /// It is not an event as the relay publishes them: another publisher's.
    NotAnEvent,
    /// An event from another source: this relay's only if the outbox has its id.
    OtherSource(Uuid),
}

/// Reads the stream's last message, to chain the next batch to it. An event this
/// relay published is named by its id; anything else by its sequence, and so is a
/// message whose headers cannot be read (a client cannot parse them): chaining by
/// sequence needs nothing of the message.
pub(super) async fn read_tail(inner: &Inner) -> Result<TailRead, TailError> {
    let mut stream = inner
        .jetstream
        .get_stream(&inner.config.stream)
        .await
        .map_err(|e| TailError::new("the stream", e))?;
    let last = stream
        .info()
        .await
        .map_err(|e| TailError::new("the stream's state", e))?
        .state
        .last_sequence;
    if last == 0 {
        return Ok(TailRead {
            tail: Tail::Empty,
            suspect: None,
        });
    }
    let by_sequence = |suspect| TailRead {
        tail: Tail::Sequence(last),
        suspect,
    };
    match stream.get_raw_message(last).await {
        Ok(message) => {
            let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
            let id = header(async_nats::header::NATS_MESSAGE_ID.as_ref())
                .filter(|id| header(crate::wire::headers::ID).as_ref() == Some(id))
                .and_then(|id| id.parse::<Uuid>().ok());
            let same_source = header(crate::wire::headers::SOURCE)
                .is_some_and(|source| crate::wire::decode_value(&source) == inner.config.source);
            Ok(match id {
                Some(id) => TailRead {
                    tail: Tail::Event { id, sequence: last },
                    suspect: (!same_source).then_some(Suspect::OtherSource(id)),
                },
                None => by_sequence(Some(Suspect::NotAnEvent)),
            })
        }
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
            Ok(by_sequence(None))
        }
        Err(error) => {
            // Its headers may not parse (another publisher's bytes), or the read
            // failed: the sequence is known, and chaining by it is as safe.
            tracing::debug!(%error, sequence = last, "cannot read the stream's last message; chaining by its sequence");
            Ok(by_sequence(Some(Suspect::NotAnEvent)))
        }
    }
}

/// Publishes a batch one event at a time, each sent only after the last was
/// acknowledged, with no chain: used while another publisher writes to the stream,
/// whose messages would break a chain. Nothing is sent while an earlier event may be
/// lost, so the order holds across reconnects. Returns one result per row (up to the
/// first that must wait) and how many foreign messages the acks showed between ours.
pub(super) async fn publish_one_by_one(
    inner: &Inner,
    batch: &mut [OutboxRow],
    sent_count: &AtomicU64,
) -> (Vec<Result<(), Failure>>, u64) {
    let mut results = Vec::with_capacity(batch.len());
    let mut last_sequence: Option<u64> = None;
    let mut foreign = 0;
    for row in batch.iter_mut() {
        let result = match send(inner, row, None).await {
            Ok(ack) => {
                sent_count.fetch_add(1, Ordering::Relaxed);
                ack.await.map_err(|e| classify(&e))
            }
            Err(failure) => Err(failure),
        };
        match result {
            Ok(ack) => {
                if !ack.duplicate {
                    if let Some(previous) = last_sequence {
                        foreign += ack.sequence.saturating_sub(previous).saturating_sub(1);
                    }
                    last_sequence = Some(ack.sequence);
                }
                results.push(Ok(()));
            }
            Err(failure) => {
                let transient = !matches!(failure, Failure::Permanent(_));
                results.push(Err(failure));
                if transient {
                    break;
                }
            }
        }
    }
    (results, foreign)
}

/// Sends one event with the expectation header `expect`, if given.
async fn send(
    inner: &Inner,
    row: &mut OutboxRow,
    expect: Option<(HeaderName, HeaderValue)>,
) -> Result<PublishAckFuture, Failure> {
    let mut headers = row
        .envelope()
        .header_map()
        .map_err(|why| Failure::Permanent(why.to_string()))?;
    if let Some((name, value)) = expect {
        headers.insert(name, value);
    }
    let subject = full_subject(inner, row);
    // The body is not needed after this: a failed event is read again.
    let payload = Bytes::from(std::mem::take(&mut row.payload).into_bytes());
    inner
        .jetstream
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(|error| classify(&error))
}

/// The subject `row` is published to.
pub(super) fn full_subject(inner: &Inner, row: &OutboxRow) -> String {
    let prefix = &inner.config.subject_prefix;
    let mut subject = String::with_capacity(prefix.len() + 1 + row.subject.len());
    subject.push_str(prefix);
    subject.push('.');
    subject.push_str(&row.subject);
    subject
}

/// What publishing a batch gave: one result per row, in order, for the rows up to the
/// first that could not even be sent.
#[derive(Debug, Default)]
pub(super) struct Published {
    /// One result per row.
    pub outcome: Vec<Result<(), Failure>>,
    /// The stream sequence JetStream gave the last row, when every row went through.
    pub last_sequence: Option<u64>,
}

impl Published {
    /// Whether every event of `batch` went through.
    pub fn whole(&self, batch: &[OutboxRow]) -> bool {
        self.outcome.len() == batch.len() && self.outcome.iter().all(Result::is_ok)
    }
}

/// Publishes a batch, many acks in flight.
///
/// Each message names its predecessor as the stream's expected last message: the
/// previous event of the batch, and for the first, the stream's last message (`tail`).
/// Pipelining alone cannot keep order when the connection dies in the middle of a
/// batch: the messages already written to the dead socket are lost, while the client
/// sends the ones it still had queued on the next connection. With the chain, JetStream
/// refuses those (`OutOfChain`), and they follow the lost ones when they are retried.
/// Chaining the first message too means a relay's stale queue (a relay cut off from
/// NATS that has since yielded or lost the lead, whose client sends what it had queued
/// when it reconnects, maybe past the duplicate window) cannot append old events
/// behind newer ones. JetStream checks `Nats-Msg-Id` first, so an event that is already
/// in the stream is acked as a duplicate whatever its predecessor.
pub(super) async fn publish(
    inner: &Inner,
    batch: &mut [OutboxRow],
    tail: &Tail,
    sent_count: &AtomicU64,
) -> Published {
    let mut sent: Vec<Result<PublishAckFuture, Failure>> = Vec::with_capacity(batch.len());
    let mut expect = tail.expectation();
    for row in batch.iter_mut() {
        match send(inner, row, expect.clone()).await {
            Ok(ack) => {
                sent_count.fetch_add(1, Ordering::Relaxed);
                expect = Some(after_event(row.id));
                sent.push(Ok(ack));
            }
            Err(failure) => {
                let transient = matches!(failure, Failure::Transient(_));
                // Not sent: the next event names the same predecessor.
                sent.push(Err(failure));
                if transient {
                    // Sending later events now could put them ahead of this one.
                    break;
                }
            }
        }
    }
    let acks = futures::future::join_all(sent.into_iter().map(|sent| async move {
        match sent {
            Ok(ack) => ack.await.map(|ack| ack.sequence).map_err(|e| classify(&e)),
            Err(failure) => Err(failure),
        }
    }))
    .await;
    let last_sequence = match acks.last() {
        Some(Ok(sequence)) if acks.len() == batch.len() => Some(*sequence),
        _ => None,
    };
    Published {
        outcome: acks.into_iter().map(|ack| ack.map(|_| ())).collect(),
        last_sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": code, "err_code": 10000, "description": "refused"
        }))
        .expect("a JetStream API error")
    }

    #[test]
    fn chain_refusals_are_out_of_chain() {
        for kind in [
            PublishErrorKind::WrongLastMessageId,
            PublishErrorKind::WrongLastSequence,
        ] {
            let failure = classify(&PublishError::new(kind));
            assert!(matches!(failure, Failure::OutOfChain(_)), "{failure:?}");
        }
    }

    #[test]
    fn what_cannot_succeed_is_permanent_and_the_rest_transient() {
        let permanent = [
            PublishError::new(PublishErrorKind::MaxPayloadExceeded),
            PublishError::with_source(PublishErrorKind::Other, api_error(400)),
            // The client refuses the subject before sending (a hand-written event type
            // or a row written by hand): it never will send it.
            PublishError::with_source(
                PublishErrorKind::Other,
                async_nats::SubjectError::InvalidFormat,
            ),
        ];
        for error in &permanent {
            assert!(matches!(classify(error), Failure::Permanent(_)), "{error}");
        }
        let transient = [
            PublishError::new(PublishErrorKind::TimedOut),
            PublishError::new(PublishErrorKind::BrokenPipe),
            PublishError::new(PublishErrorKind::StreamNotFound),
            PublishError::new(PublishErrorKind::MaxAckPending),
            PublishError::new(PublishErrorKind::Other),
            PublishError::with_source(PublishErrorKind::Other, api_error(503)),
        ];
        for error in &transient {
            assert!(matches!(classify(error), Failure::Transient(_)), "{error}");
        }
    }

    #[test]
    fn the_tail_names_the_predecessor_by_id_or_sequence() {
        let id = Uuid::now_v7();
        let (name, value) = Tail::Event { id, sequence: 7 }
            .expectation()
            .expect("a header");
        assert_eq!(name.to_string(), "Nats-Expected-Last-Msg-Id");
        assert_eq!(value.as_str(), id.to_string());
        let (name, value) = Tail::Sequence(42).expectation().expect("a header");
        assert_eq!(name.to_string(), "Nats-Expected-Last-Sequence");
        assert_eq!(value.as_str(), "42");
        assert!(Tail::Empty.expectation().is_none());
    }
}
