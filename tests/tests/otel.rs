//! The `opentelemetry` feature against the real Postgres and NATS: an emit takes the
//! current span's trace context as the event's `traceparent`, and the handler's span
//! continues the trace the event carried. The tracing subscriber is global, so this test
//! binary holds one test only.

use edupulse_events::{DomainEvent, Outgoing, Received};
use edupulse_events_tests::{wait_for, TestEnv};
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
}

const WAIT: Duration = Duration::from_secs(30);

/// The trace the current span belongs to.
fn current_trace() -> TraceId {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id()
}

#[tokio::test]
async fn the_trace_goes_from_the_emitter_to_the_handler() {
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("edupulse-tests")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let env = TestEnv::new().await;
    let service = env.service().await;
    let traces = Arc::new(Mutex::new(Vec::new()));
    let seen = traces.clone();
    let consumer = service
        .consumer("traced")
        .on(move |received: Received<LessonPublished>| {
            // Inside the handler, the current span is its `edupulse.handle`.
            seen.lock()
                .unwrap()
                .push((received.event.lesson_id, current_trace()));
            async { Ok(()) }
        })
        .start()
        .await
        .unwrap();
    let relay = service.start_relay().await.unwrap();

    // 1: emitted in a request's span, with no traceparent given.
    let request = tracing::info_span!("request");
    let request_trace = async {
        service
            .emit(LessonPublished { lesson_id: 1 })
            .await
            .unwrap();
        current_trace()
    }
    .instrument(request)
    .await;
    assert_ne!(request_trace, TraceId::INVALID);
    // 2: a traceparent given by the caller wins.
    let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    service
        .emit(Outgoing::new(LessonPublished { lesson_id: 2 }).traceparent(given))
        .instrument(tracing::info_span!("another request"))
        .await
        .unwrap();
    // 3: no span, no traceparent.
    service
        .emit(LessonPublished { lesson_id: 3 })
        .await
        .unwrap();

    wait_for(WAIT, "three events handled", || async {
        consumer.handled() == 3
    })
    .await;
    let js = env.jetstream().await;
    let messages = env.stream_messages(&js).await;
    let traceparents: Vec<&str> = messages
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("traceparent"))
                .map_or("", |v| v.as_str())
        })
        .collect();
    assert_eq!(traceparents.len(), 3);
    assert!(
        traceparents[0].starts_with(&format!("00-{request_trace:032x}-")),
        "{traceparents:?}"
    );
    assert_eq!(traceparents[1], given);
    assert_eq!(traceparents[2], "", "no span, no traceparent");

    let mut traces = traces.lock().unwrap().clone();
    traces.sort_by_key(|(lesson, _)| *lesson);
    assert_eq!(traces[0], (1, request_trace));
    assert_eq!(
        traces[1],
        (
            2,
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
        )
    );
    assert_ne!(traces[2].1, TraceId::INVALID);
    assert_ne!(traces[2].1, request_trace);

    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}
