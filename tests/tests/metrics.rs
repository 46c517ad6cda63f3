//! The metrics the relay and a consumer group record, against the real Postgres and
//! NATS, read from `metrics-util`'s debugging recorder. The recorder is global, so
//! this test binary holds one test only.

use edupulse_events::telemetry::{
    CONSUMER_DEAD_LETTERS_TOTAL, CONSUMER_HANDLED_TOTAL, CONSUMER_HANDLER_SECONDS, CONSUMER_LAG,
    EVENT_OUTBOX_SECONDS, OUTBOX_DEAD, OUTBOX_OLDEST_PENDING_SECONDS, OUTBOX_PENDING,
    RELAY_BATCH_SECONDS, RELAY_LEADER, RELAY_PUBLISHED_TOTAL, RELAY_PUBLISH_ERRORS_TOTAL,
};
use edupulse_events::{ConsumerSettings, DomainEvent};
use edupulse_events_tests::{wait_for, TestEnv};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
    pub title: String,
}

const WAIT: Duration = Duration::from_secs(30);
const GROUP: &str = "metrics-group";

/// A metric: its kind, name and labels (sorted).
type Id = (MetricKind, String, Vec<(String, String)>);

/// Everything the recorder has seen: each snapshot empties its counters, histograms and
/// gauges, so the snapshots are added up here.
#[derive(Default)]
struct Seen {
    counters: BTreeMap<Id, u64>,
    histograms: BTreeMap<Id, Vec<f64>>,
    /// Every value a gauge had when a snapshot read it.
    gauges: BTreeMap<Id, BTreeSet<u64>>,
}

impl Seen {
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let id = (key.kind(), key.key().name().to_owned(), labels);
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Histogram(values) => self
                    .histograms
                    .entry(id)
                    .or_default()
                    .extend(values.into_iter().map(|v| v.into_inner())),
                DebugValue::Gauge(v) => {
                    self.gauges
                        .entry(id)
                        .or_default()
                        .insert(v.into_inner().to_bits());
                }
            }
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .get(&id(MetricKind::Counter, name, labels))
            .copied()
            .unwrap_or(0)
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.histograms
            .get(&id(MetricKind::Histogram, name, labels))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether the gauge was read with `value`.
    fn gauge_was(&self, name: &str, labels: &[(&str, &str)], value: f64) -> bool {
        self.gauges
            .get(&id(MetricKind::Gauge, name, labels))
            .is_some_and(|values| values.contains(&value.to_bits()))
    }

    /// The gauge's readings.
    fn gauge_values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.gauges
            .get(&id(MetricKind::Gauge, name, labels))
            .map(|values| values.iter().map(|v| f64::from_bits(*v)).collect())
            .unwrap_or_default()
    }
}

fn id(kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Id {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    (kind, name.to_owned(), labels)
}

#[tokio::test]
async fn the_relay_and_a_consumer_record_their_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this binary");
    let seen = Mutex::new(Seen::default());

    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    // The stream refuses messages over 1,000 bytes: the relay's permanent failure.
    let mut stream_config = js
        .get_stream(&env.stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    stream_config.max_message_size = 1000;
    js.update_stream(&stream_config).await.unwrap();

    let consumer = service
        .consumer(GROUP)
        .settings(ConsumerSettings {
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(100),
            max_deliveries: 2,
            ..ConsumerSettings::default()
        })
        .on(
            |received: edupulse_events::Received<LessonPublished>| async move {
                if received.event.lesson_id == 3 {
                    return Err("lesson 3 always fails".into());
                }
                Ok(())
            },
        )
        .start()
        .await
        .unwrap();
    let lesson = |lesson_id, size| LessonPublished {
        lesson_id,
        title: "t".repeat(size),
    };
    service.emit(lesson(1, 1)).await.unwrap();
    service.emit(lesson(2, 1200)).await.unwrap(); // too large: dead
    service.emit(lesson(3, 1)).await.unwrap(); // its handler fails: a dead letter
    service.emit(lesson(4, 1)).await.unwrap();
    let relay = service.start_relay().await.expect("the relay starts");

    wait_for(WAIT, "two events handled and one dead letter", || async {
        consumer.handled() == 2 && consumer.dead_lettered() == 1
    })
    .await;
    // The leader reads the outbox gauges every few seconds; the dead event stays.
    wait_for(WAIT, "the gauges read with the dead event", || async {
        let mut seen = seen.lock().unwrap();
        seen.take(&snapshotter);
        seen.gauge_was(OUTBOX_DEAD, &[], 1.0)
            && seen.gauge_was(RELAY_LEADER, &[], 1.0)
            && seen.counter(RELAY_PUBLISHED_TOTAL, &[]) == 3
    })
    .await;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
    let mut seen = seen.into_inner().unwrap();
    seen.take(&snapshotter);

    // The relay.
    assert_eq!(seen.counter(RELAY_PUBLISHED_TOTAL, &[]), 3);
    assert_eq!(
        seen.counter(RELAY_PUBLISH_ERRORS_TOTAL, &[("kind", "permanent")]),
        1
    );
    assert_eq!(
        seen.counter(RELAY_PUBLISH_ERRORS_TOTAL, &[("kind", "transient")]),
        0
    );
    let outbox = seen.histogram(EVENT_OUTBOX_SECONDS, &[]);
    assert_eq!(outbox.len(), 3, "{outbox:?}");
    assert!(outbox.iter().all(|s| (0.0..30.0).contains(s)), "{outbox:?}");
    let batches = seen.histogram(RELAY_BATCH_SECONDS, &[]);
    assert!(!batches.is_empty());
    assert!(
        batches.iter().all(|s| (0.0..30.0).contains(s)),
        "{batches:?}"
    );
    // Pending: at most the 4 emitted, none left at the last reading or later.
    let pending = seen.gauge_values(OUTBOX_PENDING, &[]);
    assert!(
        pending.iter().all(|p| (0.0..=4.0).contains(p)),
        "{pending:?}"
    );
    let oldest = seen.gauge_values(OUTBOX_OLDEST_PENDING_SECONDS, &[]);
    assert!(oldest.iter().all(|s| (0.0..30.0).contains(s)), "{oldest:?}");

    // The consumer group.
    let event = ("event", "lesson.published");
    let group = ("group", GROUP);
    assert_eq!(
        seen.counter(
            CONSUMER_HANDLED_TOTAL,
            &[group, event, ("outcome", "handled")]
        ),
        2
    );
    assert_eq!(
        seen.counter(
            CONSUMER_HANDLED_TOTAL,
            &[group, event, ("outcome", "failed")]
        ),
        2
    );
    assert_eq!(
        seen.counter(
            CONSUMER_HANDLED_TOTAL,
            &[group, event, ("outcome", "duplicate")]
        ),
        0
    );
    let handler = seen.histogram(CONSUMER_HANDLER_SECONDS, &[group, event]);
    assert_eq!(handler.len(), 4, "{handler:?}");
    assert_eq!(
        seen.counter(
            CONSUMER_DEAD_LETTERS_TOTAL,
            &[group, ("reason", "handler_failed")]
        ),
        1
    );
    let lag = seen.gauge_values(CONSUMER_LAG, &[group]);
    assert!(
        !lag.is_empty() && lag.iter().all(|l| (0.0..=3.0).contains(l)),
        "{lag:?}"
    );
}
