//! A hostile, shared world on the producing side: hand-written event types, rows no
//! emit wrote, other publishers on the stream, writers that never finish.

use edupulse_events::{DomainEvent, EmitErrorKind, EventState, SubjectError};
use edupulse_events_tests::{wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published", subject = "lesson.{lesson_id}.published")]
pub struct LessonPublished {
    pub lesson_id: u32,
}

/// A hand-written impl that trusts its field to be a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HandWritten {
    subject: String,
}

impl DomainEvent for HandWritten {
    const NAME: &'static str = "hand.written";
    const VERSION: u32 = 1;
    const SUBJECT_TEMPLATE: &'static str = "{subject}";
    fn subject(&self) -> Result<String, SubjectError> {
        Ok(self.subject.clone())
    }
}

/// A hand-written impl with a name the derive would refuse.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BadName;

impl DomainEvent for BadName {
    const NAME: &'static str = "Bad Name";
    const VERSION: u32 = 1;
    const SUBJECT_TEMPLATE: &'static str = "bad";
    fn subject(&self) -> Result<String, SubjectError> {
        Ok("bad".to_owned())
    }
}

async fn outbox_rows(env: &TestEnv) -> i64 {
    let mut conn = env.connect().await;
    sqlx::query_scalar("SELECT count(*) FROM edupulse.outbox")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_hand_written_event_with_a_bad_subject_or_name_is_refused_at_emit() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    for subject in ["a.bad subject", "a..b", "a.>", "", "a.*.b", "trailing."] {
        let error = service
            .emit(HandWritten {
                subject: subject.to_owned(),
            })
            .await
            .expect_err(subject);
        assert_eq!(
            error.kind(),
            EmitErrorKind::Definition,
            "{subject:?}: {error}"
        );
        assert!(error.to_string().contains("derive"), "{error}");
    }
    let error = service.emit(BadName).await.expect_err("bad name");
    assert_eq!(error.kind(), EmitErrorKind::Definition, "{error}");
    assert_eq!(outbox_rows(&env).await, 0, "nothing is written");
    // A good subject from a hand-written impl still goes.
    service
        .emit(HandWritten {
            subject: "fine.subject".to_owned(),
        })
        .await
        .expect("a valid hand-written event");
}

#[tokio::test]
async fn a_row_whose_subject_nats_refuses_goes_dead_and_later_events_are_published() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    // A row no emit wrote (an older version, a hand-made insert): NATS refuses it.
    let bad = Uuid::now_v7();
    let mut conn = env.connect().await;
    sqlx::query(
        "INSERT INTO edupulse.outbox (id, name, version, subject, payload, source)
         VALUES ($1, 'hand.written', 1, 'a bad subject', '{}', 'test')",
    )
    .bind(bad)
    .execute(&mut conn)
    .await
    .unwrap();
    let good = service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    let relay = service.start_relay();
    wait_for(
        WAIT,
        "the event after the bad row to be published",
        || async { service.event_state(good).await.unwrap() == Some(EventState::Published) },
    )
    .await;
    assert_eq!(
        service.event_state(bad).await.unwrap(),
        Some(EventState::Dead)
    );
    assert_eq!(env.stream_ids(&js).await, vec![good]);
    let dead = service.dead_events(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("subject"),
        "{:?}",
        dead[0].last_error
    );
    relay.shutdown().await.unwrap();
}
