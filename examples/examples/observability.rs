//! Metrics and traces on the local services: the quickstart's events, published by the
//! relay and handled by a consumer group, with the library's metrics served for
//! Prometheus on a local port and its spans printed to the terminal.
//!
//! ```sh
//! cargo run -p edupulse-events-examples --example observability
//! # meanwhile, in another terminal:
//! curl -s http://127.0.0.1:9464/metrics
//! ```
//!
//! It emits a lesson and a quiz every second for `EDUPULSE_ROUNDS` rounds (default 10),
//! then serves the metrics for `EDUPULSE_SERVE_SECS` more seconds (default 30).
//! `EDUPULSE_METRICS_PORT` (default 9464) sets the port; `DATABASE_URL`, `NATS_URL`,
//! `EDUPULSE_SUBJECT_PREFIX`, `EDUPULSE_STREAM` and `EDUPULSE_SOURCE` the services, as
//! in the quickstart.
//!
//! The exporter is `metrics-exporter-prometheus` without its HTTP listener: a few
//! lines below answer every request on the port with the rendered metrics. A service
//! would use the exporter's listener (`PrometheusBuilder::install`) or its own web
//! framework's route.

use edupulse_events::{
    Config, ConsumerSettings, DomainEvent, EventService, Outgoing, Received, StartFrom, Uuid,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

/// A teacher published a lesson.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: Uuid,
    pub author_id: Uuid,
    pub title: String,
}

/// A student submitted a quiz; routed per quiz.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 2,
    subject = "quiz.{quiz_id}.submitted"
)]
pub struct QuizSubmitted {
    pub quiz_id: Uuid,
    pub student_id: Uuid,
    pub score: f32,
}

const LOCAL_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("observability example failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A number from the environment, or `default`.
fn env_number(key: &str, default: u64) -> Result<u64, Box<dyn std::error::Error>> {
    match std::env::var(key) {
        Ok(value) => Ok(value.parse().map_err(|e| format!("{key}={value:?}: {e}"))?),
        Err(_) => Ok(default),
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Traces: the library's spans (debug level) as they close, with their fields and
    // timings; everything else at info.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_span_events(FmtSpan::CLOSE)
                .with_filter(
                    Targets::new()
                        .with_target("edupulse_events", tracing::Level::DEBUG)
                        .with_default(tracing::Level::INFO),
                ),
        )
        .init();

    // Metrics: the Prometheus recorder, installed for the whole process, before the
    // service starts (handles registered earlier would go to no recorder).
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("installing the recorder: {e}"))?;
    edupulse_events::telemetry::describe_metrics();
    let port = u16::try_from(env_number("EDUPULSE_METRICS_PORT", 9464)?)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("metrics at http://127.0.0.1:{port}/metrics");
    tokio::spawn(serve(listener, prometheus));

    let config = Config::from_lookup(|key| match std::env::var(key) {
        Err(std::env::VarError::NotPresent) if key == "DATABASE_URL" => {
            Ok(LOCAL_DATABASE_URL.to_owned())
        }
        other => other,
    })?;
    let service = EventService::connect(config).await?;
    service.migrate().await?;

    let consumer = service
        .consumer("observability-grading")
        .settings(ConsumerSettings {
            start_from: StartFrom::New,
            ..ConsumerSettings::default()
        })
        .on::<LessonPublished, _, _>(|_: Received<LessonPublished>| async { Ok(()) })
        .on::<QuizSubmitted, _, _>(|received: Received<QuizSubmitted>| async move {
            if received.event.score < 0.0 {
                return Err("a negative score".into());
            }
            Ok(())
        })
        .start()
        .await?;
    let relay = service.start_relay().await?;

    let rounds = env_number("EDUPULSE_ROUNDS", 10)?;
    for round in 0..rounds {
        let lesson = LessonPublished {
            lesson_id: Uuid::now_v7(),
            author_id: Uuid::now_v7(),
            title: format!("Lesson {round}"),
        };
        let mut tx = service.pool().begin().await?;
        let lesson_event = service.emit_in(&mut tx, lesson).await?;
        let quiz = QuizSubmitted {
            quiz_id: Uuid::now_v7(),
            student_id: Uuid::now_v7(),
            score: 0.9,
        };
        service
            .emit_in(&mut tx, Outgoing::new(quiz).causation_id(lesson_event))
            .await?;
        tx.commit().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "emitted {} events; {} handled so far; serving the metrics a while longer",
        rounds * 2,
        consumer.handled()
    );
    tokio::time::sleep(Duration::from_secs(env_number("EDUPULSE_SERVE_SECS", 30)?)).await;
    consumer.shutdown().await?;
    relay.shutdown().await?;
    Ok(())
}

/// Answers every connection with the rendered metrics (a minimal HTTP/1.1 response).
async fn serve(listener: tokio::net::TcpListener, prometheus: PrometheusHandle) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        prometheus.run_upkeep();
        let body = prometheus.render();
        tokio::spawn(async move {
            // The request itself does not matter: read what came, answer.
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
