//! A whole service with `edupulse-events`, `serde` and `tokio` as its only dependencies:
//! it emits in a business transaction, relays, and consumes with effects once, using
//! the crates re-exported by `edupulse_events` (`sqlx`, `uuid`, `time`).
//!
//! ```sh
//! cargo run -p edupulse-minimal-service
//! ```

use edupulse_events::sqlx::{self, PgConnection};
use edupulse_events::{Config, DomainEvent, EventService, HandlerError, Received, Uuid};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::time::Duration;

/// A lesson was published.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
struct LessonPublished {
    lesson_id: Uuid,
    title: String,
}

/// Indexes a published lesson, once.
async fn index(
    tx: &mut PgConnection,
    received: Received<LessonPublished>,
) -> Result<(), HandlerError> {
    let published: edupulse_events::time::OffsetDateTime = received.envelope.time;
    sqlx::query("INSERT INTO minimal_index (lesson_id, title, published) VALUES ($1, $2, $3)")
        .bind(received.event.lesson_id)
        .bind(&received.event.title)
        .bind(published)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("minimal service failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_lookup(|key| match (key, std::env::var(key)) {
        ("DATABASE_URL", Err(std::env::VarError::NotPresent)) => {
            Ok("postgres://postgres@127.0.0.1:5432/postgres".to_owned())
        }
        ("EDUPULSE_SUBJECT_PREFIX", _) => Ok("minimal-example".to_owned()),
        ("EDUPULSE_STREAM", _) => Ok("MINIMAL_EXAMPLE".to_owned()),
        (_, value) => value,
    })?;
    let service = EventService::connect(config).await?;
    service.migrate().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS minimal_index (
            lesson_id UUID PRIMARY KEY, title TEXT NOT NULL, published TIMESTAMPTZ NOT NULL)",
    )
    .execute(service.pool())
    .await?;
    let relay = service.start_relay().await?;
    let indexer = service
        .consumer("minimal-indexer")
        .on_tx_fn(index)
        .start()
        .await?;

    let lesson_id = Uuid::now_v7();
    let mut tx = service.pool().begin().await?;
    service
        .emit_in(
            &mut tx,
            LessonPublished {
                lesson_id,
                title: "Lifetimes".into(),
            },
        )
        .await?;
    tx.commit().await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let indexed: Option<String> =
            sqlx::query_scalar("SELECT title FROM minimal_index WHERE lesson_id = $1")
                .bind(lesson_id)
                .fetch_optional(service.pool())
                .await?;
        if let Some(title) = indexed {
            println!("indexed {title:?}");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "not indexed within 30 s; outbox: {}",
                service.outbox_status().await?
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    indexer.shutdown().await?;
    relay.shutdown().await?;
    Ok(())
}
