//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: the service
//! installs the recorder it wants (Prometheus, StatsD, OpenTelemetry, ...) and the
//! library records into it; with no recorder installed, recording costs next to
//! nothing.
//!
//! The names below are every metric the library records; [`describe_metrics`] gives
//! each its unit and help text. Labels hold names the service chose (consumer groups)
//! and the library's own words (event names, outcomes, reasons, kinds), never a
//! connection URL or a credential.
//!
//! The relay's hot path records per batch: one counter increment per outcome kind,
//! one histogram sample for the batch, and one sample per published event for
//! [`EVENT_OUTBOX_SECONDS`], all on handles registered once per batch with no labels.
//! The consumer registers its labelled handles once per group and event type when it
//! starts.

use crate::support::pg::Within;
use crate::support::sql::{OUTBOX, PENDING_EVENTS};
use const_format::formatcp;
use metrics::{Counter, Gauge, Histogram, Unit};
use std::collections::HashMap;
use std::time::Duration;

/// Gauge: committed events not yet published (read by the leading relay every few
/// seconds).
pub const OUTBOX_PENDING: &str = "edupulse_outbox_pending";
/// Gauge: events JetStream rejected for good (status `dead` in the outbox).
pub const OUTBOX_DEAD: &str = "edupulse_outbox_dead";
/// Gauge: how long the oldest pending event has waited, in seconds; 0 when none.
pub const OUTBOX_OLDEST_PENDING_SECONDS: &str = "edupulse_outbox_oldest_pending_seconds";
/// Gauge: 1 while this replica's relay leads, 0 otherwise.
pub const RELAY_LEADER: &str = "edupulse_relay_leader";
/// Counter: events JetStream acknowledged (duplicates it already had included).
pub const RELAY_PUBLISHED_TOTAL: &str = "edupulse_relay_published_total";
/// Counter: failed publishes, by `kind`: `permanent` (the event goes dead),
/// `transient` (it is retried), `out_of_chain` (sent again at once, behind its
/// predecessor).
pub const RELAY_PUBLISH_ERRORS_TOTAL: &str = "edupulse_relay_publish_errors_total";
/// Histogram: seconds one relay batch took, from publishing its first event to
/// starting its mark.
pub const RELAY_BATCH_SECONDS: &str = "edupulse_relay_batch_seconds";
/// Histogram: seconds from an event's emit (its `occurred_at`, on the emitting
/// service's clock) to JetStream's ack of it (on the relay's clock).
pub const EVENT_OUTBOX_SECONDS: &str = "edupulse_event_outbox_seconds";
/// Counter: deliveries a handler ran on, by `group`, `event` and `outcome`:
/// `handled`, `duplicate` (the inbox had it: skipped), `failed`, `panicked`,
/// `unavailable` (Postgres out of reach: retried, not counted as a delivery).
pub const CONSUMER_HANDLED_TOTAL: &str = "edupulse_consumer_handled_total";
/// Histogram: seconds one handler call took (with its transaction, for `on_tx`
/// handlers), by `group` and `event`.
pub const CONSUMER_HANDLER_SECONDS: &str = "edupulse_consumer_handler_seconds";
/// Counter: messages recorded in the dead-letter table, by `group` and `reason` (see
/// `DeadReason::as_str`).
pub const CONSUMER_DEAD_LETTERS_TOTAL: &str = "edupulse_consumer_dead_letters_total";
/// Gauge: messages of the stream the group has not been delivered yet, by `group`
/// (JetStream's `num_pending`, as last seen by an instance of the group).
pub const CONSUMER_LAG: &str = "edupulse_consumer_lag";

/// Gives every metric of the library its unit and help text in the installed
/// recorder. Optional: call it once after installing the recorder, for exporters
/// that show descriptions (Prometheus' `# HELP`).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        OUTBOX_PENDING,
        Unit::Count,
        "Committed events not yet published"
    );
    describe_gauge!(
        OUTBOX_DEAD,
        Unit::Count,
        "Events JetStream rejected for good"
    );
    describe_gauge!(
        OUTBOX_OLDEST_PENDING_SECONDS,
        Unit::Seconds,
        "How long the oldest pending event has waited"
    );
    describe_gauge!(RELAY_LEADER, "1 while this replica's relay leads");
    describe_counter!(
        RELAY_PUBLISHED_TOTAL,
        Unit::Count,
        "Events JetStream acknowledged"
    );
    describe_counter!(
        RELAY_PUBLISH_ERRORS_TOTAL,
        Unit::Count,
        "Failed publishes, by kind (permanent, transient, out_of_chain)"
    );
    describe_histogram!(
        RELAY_BATCH_SECONDS,
        Unit::Seconds,
        "Time one relay batch took"
    );
    describe_histogram!(
        EVENT_OUTBOX_SECONDS,
        Unit::Seconds,
        "Time from an event's emit to JetStream's ack"
    );
    describe_counter!(
        CONSUMER_HANDLED_TOTAL,
        Unit::Count,
        "Handler runs, by group, event and outcome"
    );
    describe_histogram!(
        CONSUMER_HANDLER_SECONDS,
        Unit::Seconds,
        "Time one handler call took, by group and event"
    );
    describe_counter!(
        CONSUMER_DEAD_LETTERS_TOTAL,
        Unit::Count,
        "Messages moved to the dead-letter table, by group and reason"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Messages not yet delivered to the group"
    );
}

/// How often the leading relay reads the outbox gauges.
const GAUGE_PERIOD: Duration = Duration::from_secs(5);

/// The outbox gauges' reading: counts bounded by the statement timeout set before it.
const GAUGE_READING: &str = formatcp!(
    "SELECT
        (SELECT count(*) FROM {PENDING_EVENTS}) AS pending,
        (SELECT count(*) FROM {OUTBOX} WHERE status = 'dead') AS dead,
        coalesce((SELECT extract(epoch FROM (clock_timestamp() - occurred_at))::float8
                  FROM {PENDING_EVENTS} ORDER BY seq LIMIT 1), 0) AS age"
);

/// The leading relay's gauges: [`RELAY_LEADER`] is 1 while it lives, and a task reads
/// the outbox gauges every few seconds. Dropping it (leading ended, however) sets the
/// leader gauge to 0 and stops the task.
pub(crate) struct Leading {
    reader: tokio::task::JoinHandle<()>,
}

impl Leading {
    /// Starts reading the outbox gauges on `pool`, each reading bounded by `limit`.
    pub fn start(pool: sqlx::PgPool, limit: Duration) -> Leading {
        metrics::gauge!(RELAY_LEADER).set(1.0);
        let reader = tokio::spawn(async move {
            let (pending, dead, age) = (
                metrics::gauge!(OUTBOX_PENDING),
                metrics::gauge!(OUTBOX_DEAD),
                metrics::gauge!(OUTBOX_OLDEST_PENDING_SECONDS),
            );
            let mut period = tokio::time::interval(GAUGE_PERIOD);
            period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                period.tick().await;
                match read_gauges(&pool, limit).await {
                    Ok((p, d, a)) => {
                        pending.set(p as f64);
                        dead.set(d as f64);
                        age.set(a.max(0.0));
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot read the outbox gauges; trying again later");
                    }
                }
            }
        });
        Leading { reader }
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.reader.abort();
        metrics::gauge!(RELAY_LEADER).set(0.0);
    }
}

/// One reading of the outbox gauges, in a transaction whose statements time out
/// after `limit` (and which is abandoned after it on the client side too).
async fn read_gauges(pool: &sqlx::PgPool, limit: Duration) -> Result<(i64, i64, f64), sqlx::Error> {
    let reading = async {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_catalog.set_config('statement_timeout', $1, true)")
            .bind(format!("{}ms", limit.as_millis().max(1)))
            .execute(&mut *tx)
            .await?;
        let row: (i64, i64, f64) = sqlx::query_as(GAUGE_READING).fetch_one(&mut *tx).await?;
        tx.rollback().await?;
        Ok(row)
    };
    reading.within(limit.saturating_mul(2)).await
}

/// How a publish failed, for [`RELAY_PUBLISH_ERRORS_TOTAL`]'s `kind`.
pub(crate) const PUBLISH_ERROR_KINDS: [&str; 3] = ["permanent", "transient", "out_of_chain"];

/// Records one relay batch: `acked` events acknowledged (with the emit times of
/// `acked_at`), errors by kind (indexed as [`PUBLISH_ERROR_KINDS`]), and its duration.
pub(crate) fn relay_batch(
    acked_emitted_at: impl Iterator<Item = time::OffsetDateTime>,
    errors: [u64; 3],
    took: Duration,
) {
    let now = time::OffsetDateTime::now_utc();
    let outbox_seconds = metrics::histogram!(EVENT_OUTBOX_SECONDS);
    let mut acked = 0u64;
    for emitted_at in acked_emitted_at {
        acked += 1;
        outbox_seconds.record((now - emitted_at).as_seconds_f64().max(0.0));
    }
    if acked > 0 {
        metrics::counter!(RELAY_PUBLISHED_TOTAL).increment(acked);
    }
    for (kind, count) in PUBLISH_ERROR_KINDS.into_iter().zip(errors) {
        if count > 0 {
            metrics::counter!(RELAY_PUBLISH_ERRORS_TOTAL, "kind" => kind).increment(count);
        }
    }
    metrics::histogram!(RELAY_BATCH_SECONDS).record(took.as_secs_f64());
}

/// What a handler's run came to, for [`CONSUMER_HANDLED_TOTAL`]'s `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandledAs {
    Handled,
    Duplicate,
    Failed,
    Panicked,
    Unavailable,
}

impl HandledAs {
    const ALL: [HandledAs; 5] = [
        HandledAs::Handled,
        HandledAs::Duplicate,
        HandledAs::Failed,
        HandledAs::Panicked,
        HandledAs::Unavailable,
    ];

    fn as_str(self) -> &'static str {
        match self {
            HandledAs::Handled => "handled",
            HandledAs::Duplicate => "duplicate",
            HandledAs::Failed => "failed",
            HandledAs::Panicked => "panicked",
            HandledAs::Unavailable => "unavailable",
        }
    }
}

/// One event type's handles in a group.
struct EventHandles {
    /// By [`HandledAs`], in its order.
    handled: [Counter; 5],
    seconds: Histogram,
}

/// A consumer group's metric handles, registered once when the group starts (so that
/// handling an event allocates no label).
pub(crate) struct ConsumerMetrics {
    group: String,
    events: HashMap<&'static str, EventHandles>,
    lag: Gauge,
}

impl ConsumerMetrics {
    /// The handles of `group`, for the events named `events`.
    pub fn new(group: &str, events: impl Iterator<Item = &'static str>) -> ConsumerMetrics {
        let events = events
            .map(|event| {
                let handled = HandledAs::ALL.map(|outcome| {
                    metrics::counter!(
                        CONSUMER_HANDLED_TOTAL,
                        "group" => group.to_owned(),
                        "event" => event,
                        "outcome" => outcome.as_str()
                    )
                });
                let seconds = metrics::histogram!(
                    CONSUMER_HANDLER_SECONDS,
                    "group" => group.to_owned(),
                    "event" => event
                );
                (event, EventHandles { handled, seconds })
            })
            .collect();
        ConsumerMetrics {
            group: group.to_owned(),
            events,
            lag: metrics::gauge!(CONSUMER_LAG, "group" => group.to_owned()),
        }
    }

    /// One handler call of `event`, which took `took`.
    pub fn handled(&self, event: &str, outcome: HandledAs, took: Duration) {
        if let Some(handles) = self.events.get(event) {
            handles.handled[outcome as usize].increment(1);
            handles.seconds.record(took.as_secs_f64());
        }
    }

    /// A message recorded as a dead letter (rare: its labels are made here).
    pub fn dead_letter(&self, reason: &'static str) {
        metrics::counter!(
            CONSUMER_DEAD_LETTERS_TOTAL,
            "group" => self.group.clone(),
            "reason" => reason
        )
        .increment(1);
    }

    /// The group's `num_pending`, as JetStream last reported it.
    pub fn lag(&self, pending: u64) {
        self.lag.set(pending as f64);
    }
}

/// Makes the W3C `traceparent` an event carried the parent of `span` (the handler's),
/// with the `opentelemetry` feature and `tracing-opentelemetry`'s layer installed;
/// nothing otherwise, or when the header is missing or malformed.
#[allow(unused_variables)]
pub(crate) fn adopt_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    #[cfg(feature = "opentelemetry")]
    if let Some(parent) = traceparent.and_then(otel::remote_context) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        // Fails only when no OpenTelemetry layer records the span: nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// The current span's trace context as a W3C `traceparent`, for an emit given none:
/// with the `opentelemetry` feature and a valid OpenTelemetry context only.
pub(crate) fn current_traceparent() -> Option<String> {
    #[cfg(feature = "opentelemetry")]
    return otel::current();
    #[cfg(not(feature = "opentelemetry"))]
    None
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The remote context a `traceparent` names (`00-{trace}-{span}-{flags}`).
    pub fn remote_context(traceparent: &str) -> Option<Context> {
        if !crate::wire::valid_traceparent(traceparent) {
            return None;
        }
        let mut parts = traceparent.split('-').skip(1);
        let trace_id = TraceId::from_hex(parts.next()?).ok()?;
        let span_id = SpanId::from_hex(parts.next()?).ok()?;
        let flags = TraceFlags::new(u8::from_str_radix(parts.next()?, 16).ok()?);
        let remote = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
        remote
            .is_valid()
            .then(|| Context::new().with_remote_span_context(remote))
    }

    /// The current span's context, as a `traceparent`.
    pub fn current() -> Option<String> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        span_context.is_valid().then(|| {
            format!(
                "00-{:032x}-{:016x}-{:02x}",
                span_context.trace_id(),
                span_context.span_id(),
                span_context.trace_flags().to_u8()
            )
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_traceparent_becomes_a_remote_parent() {
            let context = remote_context("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                .expect("a valid traceparent");
            let span = context.span();
            let parent = span.span_context();
            assert!(parent.is_remote());
            assert_eq!(
                format!("{:032x}", parent.trace_id()),
                "0af7651916cd43dd8448eb211c80319c"
            );
            assert_eq!(format!("{:016x}", parent.span_id()), "b7ad6b7169203331");
            assert!(parent.is_sampled());
            for bad in [
                "",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            ] {
                assert!(remote_context(bad).is_none(), "{bad:?}");
            }
        }
    }
}
