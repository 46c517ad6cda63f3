//! Emitting with Postgres alone (`Emitter`), and testing handlers with the `testing`
//! feature: no NATS until a relay publishes.

use edupulse_events::{
    testing, DomainEvent, EmitErrorKind, Emitter, HandlerError, Outgoing, Received,
};
use edupulse_events_tests::{free_port, wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{quiz_id}.submitted")]
struct QuizSubmitted {
    quiz_id: i64,
    answers: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded", subject = "quiz.{quiz_id}.graded")]
struct QuizGraded {
    quiz_id: i64,
    score: u32,
}

const WAIT: Duration = Duration::from_secs(30);

/// A configuration whose NATS URL leads nowhere: an emitter never uses it.
fn without_nats(env: &TestEnv) -> edupulse_events::Config {
    env.config()
        .nats_url(format!("nats://127.0.0.1:{}", free_port()))
        .build()
        .expect("valid config")
}

/// The handler under test: grades a submission and emits the grade in the handler's
/// transaction.
async fn grade(
    emitter: &Emitter,
    tx: &mut PgConnection,
    received: Received<QuizSubmitted>,
) -> Result<(), HandlerError> {
    let score = received.event.answers.iter().filter(|a| **a == 1).count() as u32;
    sqlx::query("INSERT INTO grades (quiz_id, score) VALUES ($1, $2)")
        .bind(received.event.quiz_id)
        .bind(score as i32)
        .execute(&mut *tx)
        .await?;
    emitter
        .emit_in(
            tx,
            QuizGraded {
                quiz_id: received.event.quiz_id,
                score,
            },
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_emitter_needs_no_nats_and_a_relay_elsewhere_publishes_what_it_committed() {
    let env = TestEnv::new().await;
    let emitter = Emitter::connect(without_nats(&env))
        .await
        .expect("an emitter connects to Postgres only");
    emitter.migrate().await.expect("migrate");
    assert!(!format!("{emitter:?}").is_empty());

    let first = emitter
        .emit(QuizSubmitted {
            quiz_id: 1,
            answers: vec![1],
        })
        .await
        .expect("emit");
    let mut tx = emitter.pool().begin().await.unwrap();
    emitter
        .emit_in(
            &mut tx,
            QuizSubmitted {
                quiz_id: 2,
                answers: vec![],
            },
        )
        .await
        .expect("emit_in");
    tx.rollback().await.unwrap();
    let batch = emitter
        .emit_all((3..5).map(|quiz_id| QuizSubmitted {
            quiz_id,
            answers: vec![0],
        }))
        .await
        .expect("emit_all");
    let status = emitter.outbox_status().await.expect("status");
    assert_eq!(status.pending, 3, "{status}");
    assert!(
        status.to_string().starts_with("3 pending (oldest"),
        "{status}"
    );

    // Another process, with NATS, relays what the emitter committed (not the rolled back one).
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "everything to be published", || async {
        emitter.outbox_status().await.unwrap().pending == 0
    })
    .await;
    relay.shutdown().await.expect("relay");
    let js = env.jetstream().await;
    let mut expected = vec![first];
    expected.extend(batch);
    assert_eq!(env.stream_ids(&js).await, expected);
    assert_eq!(
        emitter.outbox_status().await.unwrap().to_string(),
        "0 pending, 0 dead"
    );
}

#[tokio::test]
async fn an_emitter_refuses_events_larger_than_its_limit() {
    let env = TestEnv::new().await;
    let emitter = Emitter::connect(without_nats(&env))
        .await
        .unwrap()
        .with_max_message_size(600);
    emitter.migrate().await.unwrap();
    assert_eq!(emitter.max_message_size(), 600);
    let error = emitter
        .emit(QuizSubmitted {
            quiz_id: 1,
            answers: vec![1; 400],
        })
        .await
        .expect_err("too large");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge, "{error}");
    // The service's emitter takes its limit from NATS.
    let service = env.service().await;
    assert_eq!(
        service.emitter().max_message_size(),
        service.max_message_size()
    );
}

#[tokio::test]
async fn a_handler_is_tested_with_a_built_event_and_what_it_emitted_comes_back_typed() {
    let env = TestEnv::new().await;
    let emitter = Emitter::connect(without_nats(&env)).await.unwrap();
    emitter.migrate().await.unwrap();
    sqlx::query("CREATE TABLE grades (quiz_id bigint PRIMARY KEY, score int NOT NULL)")
        .execute(emitter.pool())
        .await
        .unwrap();

    let mut received = testing::received(QuizSubmitted {
        quiz_id: 7,
        answers: vec![1, 0, 1],
    });
    assert_eq!(received.envelope.name, "quiz.submitted");
    assert_eq!(received.envelope.subject, "edupulse.quiz.7.submitted");
    assert_eq!(received.envelope.attempt, 1);
    let conversation = uuid::Uuid::now_v7();
    received.envelope.correlation_id = Some(conversation);
    let cause = received.envelope.clone();

    let mut tx = emitter.pool().begin().await.unwrap();
    let (result, emitted) = testing::handle(&cause, grade(&emitter, &mut tx, received)).await;
    result.expect("the handler succeeds");
    assert_eq!(
        emitted.of::<QuizGraded>().unwrap(),
        vec![QuizGraded {
            quiz_id: 7,
            score: 2
        }]
    );
    assert_eq!(emitted.names(), vec!["quiz.graded"]);
    let graded = &emitted.all()[0];
    assert_eq!(graded.causation_id, Some(cause.id));
    assert_eq!(graded.correlation_id, conversation);
    assert_eq!(graded.subject, "quiz.7.graded");
    assert!(emitted.of::<QuizSubmitted>().unwrap().is_empty());
    // Rolled back: nothing stays in the outbox or the business table.
    tx.rollback().await.unwrap();
    assert_eq!(emitter.outbox_status().await.unwrap().pending, 0);

    // Outside `handle`, emitting carries no cause; `capture` sees a plain emit too.
    let (id, emitted) = testing::capture(
        emitter.emit(
            Outgoing::new(QuizGraded {
                quiz_id: 8,
                score: 0,
            })
            .correlation_id(conversation),
        ),
    )
    .await;
    let id = id.expect("emit");
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted.all()[0].id, id);
    assert_eq!(emitted.all()[0].causation_id, None);
    // Without a capture nothing is recorded (and nothing breaks).
    emitter
        .emit(QuizGraded {
            quiz_id: 9,
            score: 1,
        })
        .await
        .expect("emit outside a capture");
}

#[tokio::test]
async fn errors_print_their_hint_in_debug_as_main_shows_them() {
    let config = edupulse_events::Config::builder(format!(
        "postgres://me:s3cret@127.0.0.1:{}/db",
        free_port()
    ))
    .connect_timeout(Duration::from_secs(2))
    .build()
    .expect("valid config");
    let error = Emitter::connect(config)
        .await
        .expect_err("nothing listens there");
    let debug = format!("{error:?}");
    assert!(debug.starts_with("ConnectError("), "{debug}");
    assert!(debug.contains("check that Postgres runs there"), "{debug}");
    assert!(!debug.contains("s3cret"), "{debug}");
    // What `main() -> Result<(), Box<dyn Error>>` prints.
    let boxed: Box<dyn std::error::Error> = error.into();
    assert!(format!("{boxed:?}").contains("check that"), "{boxed:?}");
}

#[tokio::test]
async fn a_received_built_for_a_test_emits_through_the_emitter_it_was_given() {
    let env = TestEnv::new().await;
    let emitter = Emitter::connect(without_nats(&env)).await.unwrap();
    emitter.migrate().await.unwrap();
    let received = testing::received_via(
        &emitter,
        QuizSubmitted {
            quiz_id: 3,
            answers: vec![1],
        },
    );
    let cause = received.envelope.clone();
    let mut tx = emitter.pool().begin().await.unwrap();
    let (id, emitted) = testing::capture(received.emit_in(
        &mut tx,
        QuizGraded {
            quiz_id: 3,
            score: 1,
        },
    ))
    .await;
    let id = id.expect("emit_in");
    tx.commit().await.unwrap();
    let graded = &emitted.all()[0];
    assert_eq!(graded.id, id);
    assert_eq!(graded.causation_id, Some(cause.id));
    assert_eq!(graded.correlation_id, cause.id);
    assert_eq!(emitter.outbox_status().await.unwrap().pending, 1);

    // Built without an emitter, it says what to do instead.
    let unbound = testing::received(QuizSubmitted {
        quiz_id: 4,
        answers: vec![],
    });
    let error = unbound
        .emit(QuizGraded {
            quiz_id: 4,
            score: 0,
        })
        .await
        .expect_err("no emitter");
    assert_eq!(error.kind(), EmitErrorKind::Unbound);
    assert!(error.to_string().contains("received_via"), "{error}");
}
