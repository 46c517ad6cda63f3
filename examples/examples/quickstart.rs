//! The whole path on the local services: define two events, migrate, start the relay
//! and a consumer group, commit a business row and its events in one transaction, read
//! the events back from JetStream as any client would, watch the consumer apply them
//! (once, through its inbox), and shut down cleanly.
//!
//! ```sh
//! cargo run -p edupulse-events-examples --example quickstart
//! ```
//!
//! With no environment set it uses Postgres at 127.0.0.1:5432 (user `postgres`) and
//! NATS at 127.0.0.1:4222; `DATABASE_URL`, `NATS_URL`, `EDUPULSE_SUBJECT_PREFIX`,
//! `EDUPULSE_STREAM` and `EDUPULSE_SOURCE` override them.

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use edupulse_events::{
    Config, ConnectError, ConnectErrorKind, ConsumerSettings, DomainEvent, EventService, Outgoing,
    Received, StartFrom, Uuid,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::time::Duration;

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
            eprintln!("quickstart failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_lookup(|key| match std::env::var(key) {
        Err(std::env::VarError::NotPresent) if key == "DATABASE_URL" => {
            Ok(LOCAL_DATABASE_URL.to_owned())
        }
        other => other,
    })?;

    let service = match EventService::connect(config).await {
        Ok(service) => service,
        Err(error) => {
            explain(&error);
            return Err(error.into());
        }
    };
    service.migrate().await?;
    println!(
        "connected and migrated; events go to stream {}",
        service.config().stream()
    );

    // The application's own table.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS quickstart_lessons (
            id UUID PRIMARY KEY, author_id UUID NOT NULL, title TEXT NOT NULL)",
    )
    .execute(service.pool())
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS quickstart_grades (
            quiz_id UUID NOT NULL, student_id UUID NOT NULL, score REAL NOT NULL)",
    )
    .execute(service.pool())
    .await?;

    // The consuming side: a durable consumer group. The quiz handler runs in a
    // transaction with the inbox, so its row is written once however often the event
    // is delivered.
    let consumer = service
        .consumer("quickstart-grading")
        .settings(ConsumerSettings {
            start_from: StartFrom::New,
            ..ConsumerSettings::default()
        })
        .on::<LessonPublished, _, _>(|received: Received<LessonPublished>| async move {
            println!(
                "consumer: lesson {:?} published (event {})",
                received.event.title, received.envelope.id
            );
            Ok(())
        })
        .on_tx::<QuizSubmitted, _>(|tx, received| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO quickstart_grades (quiz_id, student_id, score) VALUES ($1, $2, $3)",
                )
                .bind(received.event.quiz_id)
                .bind(received.event.student_id)
                .bind(received.event.score)
                .execute(&mut *tx)
                .await?;
                println!(
                    "consumer: graded quiz {} (caused by {:?})",
                    received.event.quiz_id, received.envelope.causation_id
                );
                Ok(())
            })
        })
        .start()
        .await?;

    // Watch the stream for what is published from now on.
    let stream = service
        .jetstream()
        .get_stream(service.config().stream())
        .await?;
    let mut messages = stream
        .create_consumer(OrderedConfig {
            filter_subject: service.full_subject(">"),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;

    let relay = service.start_relay().await?;

    // One transaction: the business row and its events commit (or roll back) together.
    let lesson = LessonPublished {
        lesson_id: Uuid::now_v7(),
        author_id: Uuid::now_v7(),
        title: "Ownership and borrowing".into(),
    };
    let mut tx = service.pool().begin().await?;
    sqlx::query("INSERT INTO quickstart_lessons (id, author_id, title) VALUES ($1, $2, $3)")
        .bind(lesson.lesson_id)
        .bind(lesson.author_id)
        .bind(&lesson.title)
        .execute(&mut *tx)
        .await?;
    let lesson_event = service.emit_in(&mut tx, lesson.clone()).await?;
    let quiz_event = service
        .emit_in(
            &mut tx,
            Outgoing::new(QuizSubmitted {
                quiz_id: Uuid::now_v7(),
                student_id: Uuid::now_v7(),
                score: 0.92,
            })
            .causation_id(lesson_event),
        )
        .await?;
    tx.commit().await?;
    println!(
        "committed lesson {} with events {lesson_event} and {quiz_event}",
        lesson.lesson_id
    );

    // Read both back from JetStream.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        let message = match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(message)) => message?,
            Ok(None) => return Err("the stream consumer ended".into()),
            Err(_) => return Err("no event arrived within 10 s; is the relay running?".into()),
        };
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("ce-id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        if id == lesson_event.to_string() || id == quiz_event.to_string() {
            println!(
                "received {} on {}: {}",
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("ce-type"))
                    .map(|v| v.as_str())
                    .unwrap_or("?"),
                message.subject,
                String::from_utf8_lossy(&message.payload)
            );
            seen.push(id);
        }
    }

    // The consumer applies both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer.handled() < 2 {
        if tokio::time::Instant::now() >= deadline {
            return Err("the consumer did not handle both events within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown().await?;
    relay.shutdown().await?;
    let status = service.outbox_status().await?;
    println!(
        "consumer and relay stopped cleanly; {} pending, {} dead",
        status.pending, status.dead
    );
    Ok(())
}

fn explain(error: &ConnectError) {
    let what = match error.kind() {
        ConnectErrorKind::Postgres => {
            "Postgres is not answering. Start it (on Debian: `pg_ctlcluster --skip-systemctl-redirect \
             $(ls /etc/postgresql) main start`, or `docker compose up -d` with this repository's \
             compose.yaml), or point DATABASE_URL at your server."
        }
        ConnectErrorKind::Nats | ConnectErrorKind::JetStream => {
            "NATS with JetStream is not answering. Start it (`nats-server -js`, or `docker compose \
             up -d` with this repository's compose.yaml), or point NATS_URL at your server."
        }
        _ => "The event service could not start; the error below says why.",
    };
    eprintln!("{what}\n");
}
