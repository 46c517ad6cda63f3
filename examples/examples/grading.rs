//! A grading service, the one a new user builds first: a web handler submits a quiz and
//! emits `quiz.submitted` in one transaction (with an `Emitter`: Postgres only); an
//! `on_tx` group grades each submission once and emits `quiz.graded` in the same
//! transaction; an at-least-once notifier tells the student. Its handler tests (below,
//! `cargo test -p edupulse-events-examples --example grading`) need Postgres only.
//!
//! ```sh
//! cargo run -p edupulse-events-examples --example grading
//! ```
//!
//! Uses Postgres at 127.0.0.1:5432 (user `postgres`) and NATS at 127.0.0.1:4222 unless
//! `DATABASE_URL` and `NATS_URL` say otherwise; its events go to the prefix
//! `grading-example` and the stream `GRADING_EXAMPLE`.

use edupulse_events::sqlx::{self, PgConnection};
use edupulse_events::{
    Config, ConsumerSettings, DomainEvent, Emitter, EventService, HandlerError, Received,
    StartFrom, Uuid,
};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A student submitted a quiz.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{quiz_id}.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: Uuid,
    pub student_id: Uuid,
    /// 1 for a right answer, 0 for a wrong one.
    pub answers: Vec<u8>,
}

/// A quiz was graded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded", subject = "quiz.{quiz_id}.graded")]
pub struct QuizGraded {
    pub quiz_id: Uuid,
    pub student_id: Uuid,
    pub score: u32,
    pub out_of: u32,
}

/// Any error, as the web handler and `main` pass them on.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS grading_submissions (
        quiz_id UUID PRIMARY KEY, student_id UUID NOT NULL, answers BYTEA NOT NULL);
    CREATE TABLE IF NOT EXISTS grading_grades (
        quiz_id UUID PRIMARY KEY, score INT NOT NULL, out_of INT NOT NULL)";

/// The web handler: the submission and its event commit together, or neither does.
pub async fn submit_quiz(emitter: &Emitter, submission: QuizSubmitted) -> Result<(), BoxError> {
    let mut tx = emitter.pool().begin().await?;
    sqlx::query(
        "INSERT INTO grading_submissions (quiz_id, student_id, answers) VALUES ($1, $2, $3)",
    )
    .bind(submission.quiz_id)
    .bind(submission.student_id)
    .bind(&submission.answers)
    .execute(&mut *tx)
    .await?;
    emitter.emit_in(&mut tx, submission).await?;
    tx.commit().await?;
    Ok(())
}

/// The grading handler: writes the grade and emits `quiz.graded` in the consumer's
/// transaction, so both happen once per submission however often it is delivered. The
/// grade is caused by the submission (`received.emit_in` sets the causation and
/// correlation ids).
pub async fn grade(
    tx: &mut PgConnection,
    received: Received<QuizSubmitted>,
) -> Result<(), HandlerError> {
    let quiz = &received.event;
    let score = quiz.answers.iter().filter(|a| **a == 1).count() as u32;
    let out_of = quiz.answers.len() as u32;
    sqlx::query("INSERT INTO grading_grades (quiz_id, score, out_of) VALUES ($1, $2, $3)")
        .bind(quiz.quiz_id)
        .bind(score as i32)
        .bind(out_of as i32)
        .execute(&mut *tx)
        .await?;
    let graded = QuizGraded {
        quiz_id: quiz.quiz_id,
        student_id: quiz.student_id,
        score,
        out_of,
    };
    received.emit_in(tx, graded).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `Display`, not `Debug`: our errors say there what went wrong and what to do.
            eprintln!("grading failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let config = Config::from_lookup(|key| match (key, std::env::var(key)) {
        ("DATABASE_URL", Err(std::env::VarError::NotPresent)) => {
            Ok("postgres://postgres@127.0.0.1:5432/postgres".to_owned())
        }
        ("EDUPULSE_SUBJECT_PREFIX", _) => Ok("grading-example".to_owned()),
        ("EDUPULSE_STREAM", _) => Ok("GRADING_EXAMPLE".to_owned()),
        ("EDUPULSE_SOURCE", _) => Ok("grading-service".to_owned()),
        (_, value) => value,
    })?;

    // The worker: relay and consumers (Postgres and NATS).
    let service = EventService::connect(config.clone()).await?;
    service.migrate().await?;
    sqlx::raw_sql(SCHEMA).execute(service.pool()).await?;
    let relay = service.start_relay().await?;
    let grading = service
        .consumer("grading")
        .settings(ConsumerSettings {
            start_from: StartFrom::New,
            ..ConsumerSettings::default()
        })
        .on_tx_fn(grade)
        .start()
        .await?;
    let notified = Arc::new(AtomicUsize::new(0));
    let seen = notified.clone();
    let notifier = service
        .consumer("grading-notifier")
        .settings(ConsumerSettings {
            start_from: StartFrom::New,
            ..ConsumerSettings::default()
        })
        .on(move |received: Received<QuizGraded>| {
            let seen = seen.clone();
            async move {
                let graded = received.event;
                println!(
                    "notify student {}: {}/{} on quiz {}",
                    graded.student_id, graded.score, graded.out_of, graded.quiz_id
                );
                seen.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .start()
        .await?;

    // The web process: Postgres only.
    let web = Emitter::connect(config).await?;
    let submissions = 10;
    for n in 0..submissions {
        let answers = (0..5).map(|i| u8::from((n + i) % 3 != 0)).collect();
        submit_quiz(
            &web,
            QuizSubmitted {
                quiz_id: Uuid::now_v7(),
                student_id: Uuid::now_v7(),
                answers,
            },
        )
        .await?;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while notified.load(Ordering::SeqCst) < submissions {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "only {} of {submissions} students notified within 30 s; outbox: {}",
                notified.load(Ordering::SeqCst),
                service.outbox_status().await?
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{submissions} quizzes graded and notified; outbox: {}",
        service.outbox_status().await?
    );
    notifier.shutdown().await?;
    grading.shutdown().await?;
    relay.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edupulse_events::testing;
    use edupulse_events_tests::TestEnv;

    /// A fresh, migrated database with the example's tables, and an emitter on it.
    async fn emitter() -> (TestEnv, Emitter) {
        let env = TestEnv::new().await;
        let config = env.config().build().expect("config");
        let emitter = Emitter::connect(config).await.expect("Postgres");
        emitter.migrate().await.expect("migrate");
        sqlx::raw_sql(SCHEMA)
            .execute(emitter.pool())
            .await
            .expect("schema");
        (env, emitter)
    }

    #[tokio::test]
    async fn grading_writes_the_grade_and_emits_it_caused_by_the_submission() {
        let (_env, emitter) = emitter().await;
        let submitted = QuizSubmitted {
            quiz_id: Uuid::now_v7(),
            student_id: Uuid::now_v7(),
            answers: vec![1, 0, 1, 1],
        };
        let received = testing::received_via(&emitter, submitted.clone());
        let cause = received.envelope.clone();
        let mut tx = emitter.pool().begin().await.expect("begin");
        let (result, emitted) = testing::capture(grade(&mut tx, received)).await;
        result.expect("grading succeeds");
        assert_eq!(
            emitted.of::<QuizGraded>().expect("decodes"),
            vec![QuizGraded {
                quiz_id: submitted.quiz_id,
                student_id: submitted.student_id,
                score: 3,
                out_of: 4
            }]
        );
        assert_eq!(emitted.all()[0].causation_id, Some(cause.id));
        let score: i32 = sqlx::query_scalar("SELECT score FROM grading_grades WHERE quiz_id = $1")
            .bind(submitted.quiz_id)
            .fetch_one(&mut *tx)
            .await
            .expect("the grade is written");
        assert_eq!(score, 3);
    }

    #[tokio::test]
    async fn submitting_emits_the_submission() {
        let (_env, emitter) = emitter().await;
        let submission = QuizSubmitted {
            quiz_id: Uuid::now_v7(),
            student_id: Uuid::now_v7(),
            answers: vec![],
        };
        let (result, emitted) = testing::capture(submit_quiz(&emitter, submission.clone())).await;
        result.expect("submitting works");
        assert_eq!(
            emitted.of::<QuizSubmitted>().expect("decodes"),
            vec![submission]
        );
        // Submitting the same quiz twice fails, and emits nothing the second time.
        let (again, emitted) = testing::capture(submit_quiz(
            &emitter,
            QuizSubmitted {
                quiz_id: emitted.of::<QuizSubmitted>().expect("decodes")[0].quiz_id,
                student_id: Uuid::now_v7(),
                answers: vec![],
            },
        ))
        .await;
        assert!(again.is_err());
        assert!(emitted.is_empty());
    }
}
