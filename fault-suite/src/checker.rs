//! The checker, in the style of Jepsen's queue checker.
//!
//! Every event carries `(writer, counter)`. Writers record what they attempted and
//! how it ended ([`History`]); at the end the suite reads what committed (the business
//! table, written in the emitting transaction), what was published (the whole stream),
//! and what was handled (the effects table and the inbox) ([`observe`]), and
//! [`check`] classifies every event:
//!
//! - **lost**: committed but never handled;
//! - **unexpected**: handled or published but never committed (rolled back, failed,
//!   or never attempted);
//! - **duplicated effects**: handled (effect committed) more than once;
//! - **order violations**: per subject (= per writer), counters out of order in the
//!   stream or in the order effects were applied; and, where the outbox rows are still
//!   there, events published out of outbox sequence order.

use crate::Tick;
use async_nats::jetstream;
use futures::StreamExt;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

/// An event's identity in the checker: (writer, counter).
pub type Key = (u32, u64);

/// How an attempted transaction ended, as its writer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The commit succeeded.
    Committed,
    /// The writer rolled it back on purpose.
    RolledBack,
    /// It failed before the commit was sent: not committed.
    Failed,
    /// The commit was sent and no answer came: committed or not (indeterminate).
    Unknown,
}

/// What the writers attempted, and how each attempt ended.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<HashMap<Key, Outcome>>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Records that `writer`'s counters `counters` (one transaction) ended with `outcome`.
    pub fn record(&self, writer: u32, counters: Range<u64>, outcome: Outcome) {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        for counter in counters {
            ops.insert((writer, counter), outcome);
        }
    }

    /// Every attempted event and its outcome.
    pub fn snapshot(&self) -> HashMap<Key, Outcome> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many events ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|o| **o == outcome)
            .count()
    }
}

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// Its stream sequence.
    pub stream_seq: u64,
    /// Its `Nats-Msg-Id` (the event id).
    pub id: Uuid,
    /// The event.
    pub key: Key,
}

/// One row of the effects table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectRow {
    /// Its place in the order effects were applied.
    pub applied: i64,
    /// The event id.
    pub event_id: Uuid,
    /// The event.
    pub key: Key,
}

/// Everything the checker reads at the end of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// What committed: the business table.
    pub committed: Vec<Key>,
    /// The stream, in stream order.
    pub stream: Vec<StreamEntry>,
    /// Messages of the stream that are not readable suite events.
    pub undecodable: usize,
    /// The effects, in the order they were applied.
    pub effects: Vec<EffectRow>,
    /// The event ids the group's inbox holds.
    pub inbox: Vec<Uuid>,
    /// Outbox sequence numbers of the event ids still in the outbox.
    pub outbox_seq: HashMap<Uuid, i64>,
    /// Outbox rows still pending.
    pub pending: i64,
    /// Outbox rows JetStream rejected for good.
    pub dead_events: i64,
    /// Dead letters of the group.
    pub dead_letters: i64,
}

/// Reads the business table, the whole stream, the effects, the group's inbox and the
/// outbox. `pool` must reach the scenario's database directly.
///
/// # Panics
/// If Postgres or NATS fails (tests only).
pub async fn observe(
    pool: &PgPool,
    js: &jetstream::Context,
    stream: &str,
    group: &str,
) -> Observed {
    let committed: Vec<(i32, i64)> =
        sqlx::query_as("SELECT writer, counter FROM fault_business ORDER BY writer, counter")
            .fetch_all(pool)
            .await
            .expect("read the business table");
    let effects: Vec<(i64, Uuid, i32, i64)> = sqlx::query_as(
        "SELECT applied, event_id, writer, counter FROM fault_effects ORDER BY applied",
    )
    .fetch_all(pool)
    .await
    .expect("read the effects");
    let inbox: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM edupulse.inbox WHERE consumer_group = $1")
            .bind(group)
            .fetch_all(pool)
            .await
            .expect("read the inbox");
    let outbox: Vec<(Uuid, i64)> = sqlx::query_as("SELECT id, seq FROM edupulse.outbox")
        .fetch_all(pool)
        .await
        .expect("read the outbox");
    let (pending, dead_events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM edupulse.pending_events),
                (SELECT count(*) FROM edupulse.outbox WHERE status = 'dead')",
    )
    .fetch_one(pool)
    .await
    .expect("count the outbox");
    let dead_letters: i64 =
        sqlx::query_scalar("SELECT count(*) FROM edupulse.dead_letters WHERE consumer_group = $1")
            .bind(group)
            .fetch_one(pool)
            .await
            .expect("count dead letters");
    let (stream, undecodable) = drain_stream(js, stream).await;
    let key = |writer: i32, counter: i64| (writer as u32, counter as u64);
    Observed {
        committed: committed.into_iter().map(|(w, c)| key(w, c)).collect(),
        stream,
        undecodable,
        effects: effects
            .into_iter()
            .map(|(applied, event_id, w, c)| EffectRow {
                applied,
                event_id,
                key: key(w, c),
            })
            .collect(),
        inbox,
        outbox_seq: outbox.into_iter().collect(),
        pending,
        dead_events,
        dead_letters,
    }
}

/// Reads every message of `stream` in stream order; returns the suite's events and how
/// many messages were not.
///
/// Reads one message by its sequence, again while the read fails for want of an
/// answer (in a cluster, a read during or just after a leader election times out or
/// finds the stream unavailable for a few seconds); the last error after 30 s. A
/// message that is there but cannot be read (headers no client can parse) fails at
/// once: retrying it would only wait.
async fn read_with_retries(
    handle: &jetstream::stream::Stream,
    sequence: u64,
) -> Result<jetstream::message::StreamMessage, jetstream::stream::RawMessageError> {
    use jetstream::stream::RawMessageErrorKind;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(50);
    let unanswered = |error: &jetstream::stream::RawMessageError| match error.kind() {
        RawMessageErrorKind::JetStream(_) => true,
        RawMessageErrorKind::Other => error.to_string().contains("request"),
        _ => false,
    };
    loop {
        match handle.get_raw_message(sequence).await {
            Err(error) if unanswered(&error) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            read => return read,
        }
    }
}

/// # Panics
/// If the stream cannot be read within a minute plus a second per 2,000 messages.
pub async fn drain_stream(js: &jetstream::Context, stream: &str) -> (Vec<StreamEntry>, usize) {
    let mut handle = js.get_stream(stream).await.expect("the stream exists");
    let (first, last, count) = {
        let state = &handle.info().await.expect("stream info").state;
        (state.first_sequence, state.last_sequence, state.messages)
    };
    if count == 0 {
        return (Vec::new(), 0);
    }
    // Each message by its sequence, not through a consumer: a message whose headers
    // no client can parse makes async-nats drop a consumer's connection, while a
    // direct read of it only fails (and counts as undecodable).
    let limit = Duration::from_secs(60 + count / 2_000);
    let reads = futures::stream::iter(first..=last)
        .map(|sequence| {
            let handle = &handle;
            async move { (sequence, read_with_retries(handle, sequence).await) }
        })
        .buffered(64)
        .collect::<Vec<_>>();
    let reads = tokio::time::timeout(limit, reads)
        .await
        .unwrap_or_else(|_| panic!("the stream is read within {limit:?}"));
    let mut out = Vec::with_capacity(count as usize);
    let mut undecodable = 0;
    for (stream_seq, read) in reads {
        let message = match read {
            Ok(message) => message,
            Err(error)
                if error.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                continue;
            }
            Err(_) => {
                undecodable += 1;
                continue;
            }
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .and_then(|v| v.as_str().parse::<Uuid>().ok());
        match (id, serde_json::from_slice::<Tick>(&message.payload)) {
            (Some(id), Ok(tick)) => out.push(StreamEntry {
                stream_seq,
                id,
                key: (tick.writer, tick.counter),
            }),
            _ => undecodable += 1,
        }
    }
    (out, undecodable)
}

/// A pair of events of one subject in the wrong order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderViolation {
    /// The writer (subject).
    pub writer: u32,
    /// The counter seen first.
    pub before: u64,
    /// The smaller counter seen after it.
    pub after: u64,
}

/// What the checker found. [`Report::assert_clean`] fails the test on any anomaly.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Events attempted by the writers.
    pub attempted: usize,
    /// Attempts their writers saw commit.
    pub acknowledged: usize,
    /// Attempts rolled back on purpose.
    pub rolled_back: usize,
    /// Attempts that failed before their commit.
    pub failed: usize,
    /// Attempts whose commit had no answer.
    pub indeterminate: usize,
    /// Of the indeterminate ones, how many did commit.
    pub indeterminate_committed: usize,
    /// Events committed (the business table).
    pub committed: usize,
    /// Distinct events in the stream.
    pub published: usize,
    /// Distinct events handled (with an effect).
    pub handled: usize,
    /// Committed, never handled.
    pub lost: Vec<Key>,
    /// Committed, never published.
    pub unpublished: Vec<Key>,
    /// Handled or published, never committed.
    pub unexpected: Vec<Key>,
    /// A writer's view that contradicts the business table (a commit it saw that is
    /// not there, or a rollback that is), or a committed row nobody attempted.
    pub history_mismatch: Vec<(Key, Option<Outcome>)>,
    /// Events whose effect was applied more than once, with the count.
    pub duplicated_effects: Vec<(Key, usize)>,
    /// Events in the stream more than once, with the count.
    pub stream_duplicates: Vec<(Key, usize)>,
    /// Per-subject order violations in the stream.
    pub stream_order: Vec<OrderViolation>,
    /// Per-subject order violations in the order effects were applied.
    pub handled_order: Vec<OrderViolation>,
    /// Events published after an event of a later outbox sequence (only events whose
    /// outbox row is still there are compared).
    pub sequence_order: Vec<Uuid>,
    /// Effects whose event is not in the inbox (the inbox and the effect commit
    /// together, so this must be empty).
    pub effects_without_inbox: usize,
    /// Inbox entries without an effect.
    pub inbox_without_effect: usize,
    /// Stream messages that are not suite events.
    pub undecodable: usize,
    /// Outbox rows still pending at the end.
    pub pending: i64,
    /// Dead outbox rows.
    pub dead_events: i64,
    /// Dead letters.
    pub dead_letters: i64,
}

/// Classifies every event; see the module documentation.
pub fn check(history: &History, observed: &Observed) -> Report {
    let attempts = history.snapshot();
    let committed: HashSet<Key> = observed.committed.iter().copied().collect();
    let mut report = Report {
        attempted: attempts.len(),
        committed: committed.len(),
        undecodable: observed.undecodable,
        pending: observed.pending,
        dead_events: observed.dead_events,
        dead_letters: observed.dead_letters,
        ..Report::default()
    };
    for (key, outcome) in &attempts {
        match outcome {
            Outcome::Committed => report.acknowledged += 1,
            Outcome::RolledBack => report.rolled_back += 1,
            Outcome::Failed => report.failed += 1,
            Outcome::Unknown => {
                report.indeterminate += 1;
                if committed.contains(key) {
                    report.indeterminate_committed += 1;
                }
            }
        }
        let consistent = match outcome {
            Outcome::Committed => committed.contains(key),
            Outcome::RolledBack | Outcome::Failed => !committed.contains(key),
            Outcome::Unknown => true,
        };
        if !consistent {
            report.history_mismatch.push((*key, Some(*outcome)));
        }
    }
    for key in &committed {
        if !attempts.contains_key(key) {
            report.history_mismatch.push((*key, None));
        }
    }

    // Published.
    let mut in_stream: HashMap<Key, usize> = HashMap::new();
    for entry in &observed.stream {
        *in_stream.entry(entry.key).or_default() += 1;
    }
    report.published = in_stream.len();
    report.stream_duplicates = in_stream
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| (*k, *n))
        .collect();
    report.unpublished = committed
        .iter()
        .filter(|k| !in_stream.contains_key(k))
        .copied()
        .collect();

    // Handled.
    let mut effects: HashMap<Key, usize> = HashMap::new();
    for effect in &observed.effects {
        *effects.entry(effect.key).or_default() += 1;
    }
    report.handled = effects.len();
    report.duplicated_effects = effects
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| (*k, *n))
        .collect();
    report.lost = committed
        .iter()
        .filter(|k| !effects.contains_key(k))
        .copied()
        .collect();
    let mut unexpected: HashSet<Key> = HashSet::new();
    unexpected.extend(in_stream.keys().filter(|k| !committed.contains(k)));
    unexpected.extend(effects.keys().filter(|k| !committed.contains(k)));
    report.unexpected = unexpected.into_iter().collect();

    // Order, per subject.
    report.stream_order = per_subject_order(observed.stream.iter().map(|e| e.key));
    report.handled_order = per_subject_order(observed.effects.iter().map(|e| e.key));
    let mut highest = i64::MIN;
    let mut seen = HashSet::new();
    for entry in &observed.stream {
        if !seen.insert(entry.id) {
            continue;
        }
        if let Some(seq) = observed.outbox_seq.get(&entry.id) {
            if *seq < highest {
                report.sequence_order.push(entry.id);
            }
            highest = highest.max(*seq);
        }
    }

    let inbox: HashSet<Uuid> = observed.inbox.iter().copied().collect();
    let effect_ids: HashSet<Uuid> = observed.effects.iter().map(|e| e.event_id).collect();
    report.effects_without_inbox = effect_ids.difference(&inbox).count();
    report.inbox_without_effect = inbox.difference(&effect_ids).count();

    for list in [
        &mut report.lost,
        &mut report.unpublished,
        &mut report.unexpected,
    ] {
        list.sort_unstable();
    }
    report.duplicated_effects.sort_unstable();
    report.stream_duplicates.sort_unstable();
    report
}

/// The per-writer inversions of `keys` (the first occurrence of each key counts).
fn per_subject_order(keys: impl Iterator<Item = Key>) -> Vec<OrderViolation> {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut seen: HashSet<Key> = HashSet::new();
    let mut violations = Vec::new();
    for (writer, counter) in keys {
        if !seen.insert((writer, counter)) {
            continue;
        }
        match last.get(&writer) {
            Some(&before) if counter < before => violations.push(OrderViolation {
                writer,
                before,
                after: counter,
            }),
            _ => {
                last.insert(writer, counter);
            }
        }
    }
    violations
}

impl Report {
    /// The anomalies, by name, with their counts; empty when the run is clean.
    pub fn anomalies(&self) -> Vec<(&'static str, usize)> {
        let counts = [
            ("lost", self.lost.len()),
            ("unpublished", self.unpublished.len()),
            ("unexpected", self.unexpected.len()),
            ("history mismatch", self.history_mismatch.len()),
            ("duplicated effects", self.duplicated_effects.len()),
            ("stream duplicates", self.stream_duplicates.len()),
            ("stream order violations", self.stream_order.len()),
            ("handled order violations", self.handled_order.len()),
            ("sequence order violations", self.sequence_order.len()),
            ("effects without inbox entry", self.effects_without_inbox),
            ("inbox entries without effect", self.inbox_without_effect),
            ("undecodable messages", self.undecodable),
            (
                "still pending",
                usize::try_from(self.pending).unwrap_or(usize::MAX),
            ),
            (
                "dead events",
                usize::try_from(self.dead_events).unwrap_or(usize::MAX),
            ),
            (
                "dead letters",
                usize::try_from(self.dead_letters).unwrap_or(usize::MAX),
            ),
        ];
        counts.into_iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Panics with the whole report if any anomaly was found.
    pub fn assert_clean(&self) {
        let anomalies = self.anomalies();
        assert!(anomalies.is_empty(), "anomalies {anomalies:?}\n{self}");
    }

    /// Like [`Report::assert_clean`], but the anomalies named in `tolerated` (as
    /// [`Report::anomalies`] names them) are only printed.
    pub fn assert_clean_except(&self, tolerated: &[&str]) {
        let (tolerated, anomalies): (Vec<_>, Vec<_>) = self
            .anomalies()
            .into_iter()
            .partition(|(name, _)| tolerated.contains(name));
        if !tolerated.is_empty() {
            println!("tolerated anomalies {tolerated:?}");
        }
        assert!(anomalies.is_empty(), "anomalies {anomalies:?}\n{self}");
    }

    /// Like [`Report::assert_clean`], but events published out of outbox sequence
    /// order are expected for exactly `expected` (and nothing else).
    pub fn assert_clean_with_sequence_exceptions(&self, expected: &[Uuid]) {
        let mut got = self.sequence_order.clone();
        let mut want = expected.to_vec();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "events published out of sequence order\n{self}");
        let anomalies: Vec<_> = self
            .anomalies()
            .into_iter()
            .filter(|(name, _)| *name != "sequence order violations")
            .collect();
        assert!(anomalies.is_empty(), "anomalies {anomalies:?}\n{self}");
    }

    /// A one-line summary of the counts.
    pub fn summary(&self) -> String {
        format!(
            "attempted {} (acknowledged {}, rolled back {}, failed {}, indeterminate {} of \
             which {} committed); committed {}, published {}, handled {}; lost {}, \
             unexpected {}, duplicated effects {}, stream duplicates {}, order violations \
             (stream {}, handled {}, sequence {})",
            self.attempted,
            self.acknowledged,
            self.rolled_back,
            self.failed,
            self.indeterminate,
            self.indeterminate_committed,
            self.committed,
            self.published,
            self.handled,
            self.lost.len(),
            self.unexpected.len(),
            self.duplicated_effects.len(),
            self.stream_duplicates.len(),
            self.stream_order.len(),
            self.handled_order.len(),
            self.sequence_order.len(),
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn some<T: fmt::Debug>(list: &[T]) -> String {
            let shown: Vec<String> = list.iter().take(10).map(|x| format!("{x:?}")).collect();
            let more = list.len().saturating_sub(10);
            if more > 0 {
                format!("[{} … and {more} more]", shown.join(", "))
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
        writeln!(f, "{}", self.summary())?;
        writeln!(f, "  lost (committed, never handled): {}", some(&self.lost))?;
        writeln!(
            f,
            "  unpublished (committed, not in the stream): {}",
            some(&self.unpublished)
        )?;
        writeln!(
            f,
            "  unexpected (never committed): {}",
            some(&self.unexpected)
        )?;
        writeln!(f, "  history mismatch: {}", some(&self.history_mismatch))?;
        writeln!(
            f,
            "  duplicated effects: {}",
            some(&self.duplicated_effects)
        )?;
        writeln!(f, "  stream duplicates: {}", some(&self.stream_duplicates))?;
        writeln!(f, "  stream order: {}", some(&self.stream_order))?;
        writeln!(f, "  handled order: {}", some(&self.handled_order))?;
        writeln!(f, "  sequence order: {}", some(&self.sequence_order))?;
        write!(
            f,
            "  effects without inbox {}, inbox without effect {}, undecodable {}, pending {}, \
             dead events {}, dead letters {}",
            self.effects_without_inbox,
            self.inbox_without_effect,
            self.undecodable,
            self.pending,
            self.dead_events,
            self.dead_letters
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, id: Uuid, key: Key) -> StreamEntry {
        StreamEntry {
            stream_seq: seq,
            id,
            key,
        }
    }

    fn effect(applied: i64, id: Uuid, key: Key) -> EffectRow {
        EffectRow {
            applied,
            event_id: id,
            key,
        }
    }

    /// A clean run is clean; every kind of anomaly is caught.
    #[test]
    fn classifies_every_anomaly() {
        let history = History::new();
        history.record(1, 0..3, Outcome::Committed);
        history.record(1, 3..4, Outcome::RolledBack);
        history.record(2, 0..1, Outcome::Unknown);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let clean = Observed {
            committed: vec![(1, 0), (1, 1), (1, 2), (2, 0)],
            stream: vec![
                entry(1, ids[0], (1, 0)),
                entry(2, ids[1], (1, 1)),
                entry(3, ids[4], (2, 0)),
                entry(4, ids[2], (1, 2)),
            ],
            effects: vec![
                effect(1, ids[0], (1, 0)),
                effect(2, ids[1], (1, 1)),
                effect(3, ids[4], (2, 0)),
                effect(4, ids[2], (1, 2)),
            ],
            inbox: vec![ids[0], ids[1], ids[2], ids[4]],
            outbox_seq: [(ids[0], 1), (ids[1], 2), (ids[4], 3), (ids[2], 4)]
                .into_iter()
                .collect(),
            ..Observed::default()
        };
        let report = check(&history, &clean);
        report.assert_clean();
        assert_eq!(report.indeterminate_committed, 1);
        assert_eq!(
            (report.committed, report.published, report.handled),
            (4, 4, 4)
        );

        // Lose (1, 1), handle the rolled-back (1, 3), apply (1, 2) twice, publish
        // (1, 0) twice, and swap (1, 0) and (1, 2) in the handled order.
        let mut bad = clean.clone();
        bad.effects = vec![
            effect(1, ids[2], (1, 2)),
            effect(2, ids[0], (1, 0)),
            effect(3, ids[4], (2, 0)),
            effect(4, ids[2], (1, 2)),
            effect(5, ids[3], (1, 3)),
        ];
        bad.stream.push(entry(5, ids[0], (1, 0)));
        bad.stream.push(entry(6, ids[3], (1, 3)));
        bad.outbox_seq.insert(ids[3], 0);
        let report = check(&history, &bad);
        assert_eq!(report.lost, vec![(1, 1)]);
        assert_eq!(report.unexpected, vec![(1, 3)]);
        assert_eq!(report.duplicated_effects, vec![((1, 2), 2)]);
        assert_eq!(report.stream_duplicates, vec![((1, 0), 2)]);
        assert_eq!(
            report.handled_order,
            vec![OrderViolation {
                writer: 1,
                before: 2,
                after: 0
            }]
        );
        assert_eq!(report.sequence_order, vec![ids[3]]);
        assert_eq!(report.effects_without_inbox, 1);
        assert_eq!(report.inbox_without_effect, 1);
        assert!(!report.anomalies().is_empty());

        // A commit the writer saw that is not there.
        let mut missing = clean.clone();
        missing.committed.retain(|k| *k != (1, 2));
        let report = check(&history, &missing);
        assert_eq!(
            report.history_mismatch,
            vec![((1, 2), Some(Outcome::Committed))]
        );
        assert_eq!(report.unexpected, vec![(1, 2)]);
    }
}
