//! A hostile, shared world on the producing side: hand-written event types, rows no
//! emit wrote, other publishers on the stream, writers that never finish.

use edupulse_events::{DomainEvent, EmitErrorKind, EventState, SubjectError};
use edupulse_events_tests::{foreign_publisher, raw_hpub, wait_for, NatsServer, TestEnv};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    let relay = service.start_relay().await.expect("the relay starts");
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

#[tokio::test]
async fn another_publisher_on_the_prefix_costs_at_most_one_batch_and_our_order_holds() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    let ids = service
        .emit_all((0..3_000).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client = async_nats::connect(env.nats_url.as_str()).await.unwrap();
    let publisher = foreign_publisher(client, format!("{}.other.stuff", env.prefix), stop.clone());
    wait_for(WAIT, "the other publisher's first messages", || async {
        env.stream_len(&js).await >= 5
    })
    .await;

    let relay = service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "every event to be published", || async {
        service.outbox_status().await.unwrap().pending == 0 && relay.published() == 3_000
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let foreign_sent = publisher.await.unwrap();
    assert!(foreign_sent > 0);

    assert_eq!(
        env.our_ids(&js).await,
        ids,
        "each event once, in sequence order"
    );
    let batch = u64::from(TestEnv::fast_relay().batch_size);
    assert!(
        relay.sent() <= 3_000 + batch,
        "{} sends for 3,000 events: more than one batch sent again",
        relay.sent()
    );
    let status = service.outbox_status().await.unwrap();
    assert!(status.foreign_messages > 0, "{status:?}");
    assert!(status.last_foreign_message_age.is_some(), "{status:?}");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_another_publisher_our_order_holds_across_a_nats_restart() {
    let mut nats = NatsServer::start().await;
    let env = TestEnv::with_nats(nats.url()).await;
    let service = env.service().await;
    let ids = service
        .emit_all((0..2_000).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let client = async_nats::connect(env.nats_url.as_str()).await.unwrap();
    let publisher = foreign_publisher(client, format!("{}.other.stuff", env.prefix), stop.clone());
    let relay = service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "some events to be published", || async {
        relay.published() >= 200
    })
    .await;
    nats.restart().await;
    wait_for(
        WAIT,
        "every event to be published after the restart",
        || async {
            service.outbox_status().await.unwrap().pending == 0 && relay.published() >= 2_000
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    let js = env.jetstream().await;
    assert_eq!(
        env.our_ids(&js).await,
        ids,
        "each event once, in sequence order"
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_message_with_headers_no_client_can_parse_at_the_streams_tail_does_not_stop_the_relay() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    let subject = format!("{}.other.stuff", env.prefix);
    for headers in [
        "NATS/1.0\r\nBad Name: x\r\n\r\n",
        "NATS/1.0\r\nno colon here\r\n\r\n",
        "NATS/1.0\r\nN\u{e4}me: x\r\n\r\n",
    ] {
        raw_hpub(&env.nats_url, &subject, headers, "garbage").await;
        let before = env.stream_len(&js).await;
        let id = service
            .emit(LessonPublished { lesson_id: 7 })
            .await
            .unwrap();
        let relay = service.start_relay().await.expect("the relay starts");
        wait_for(WAIT, "the event after the unparseable message", || async {
            service.event_state(id).await.unwrap() == Some(EventState::Published)
        })
        .await;
        relay.shutdown().await.unwrap();
        assert_eq!(env.stream_len(&js).await, before + 1, "{headers:?}");
    }
}

/// A subject of `len` bytes: tokens of about 200 `x`, dot-separated.
fn subject_of(len: usize) -> String {
    let mut subject = "x".repeat(len.min(200));
    while subject.len() < len {
        let rest = len - subject.len();
        if rest == 1 {
            // No room for a dot and a token: the last token grows by one.
            subject.push('x');
        } else {
            subject.push('.');
            subject.push_str(&"x".repeat((rest - 1).min(200)));
        }
    }
    subject
}

#[tokio::test]
async fn a_subject_longer_than_nats_carries_is_refused_at_emit_and_the_longest_accepted_is_published(
) {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    let max = 3_840 - env.prefix.len() - 1;
    let too_long = HandWritten {
        subject: subject_of(max + 1),
    };
    let error = service.emit(too_long).await.expect_err("too long");
    assert_eq!(error.kind(), EmitErrorKind::Subject, "{error}");
    assert!(error.to_string().contains("3840"), "{error}");
    let longest = subject_of(max);
    assert_eq!(env.prefix.len() + 1 + longest.len(), 3_840);
    let id = service
        .emit(HandWritten { subject: longest })
        .await
        .expect("the longest subject");
    let relay = service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "the longest subject to be published", || async {
        service.event_state(id).await.unwrap() == Some(EventState::Published)
    })
    .await;
    assert_eq!(env.stream_ids(&js).await, vec![id]);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_existing_stream_that_can_drop_unread_events_is_refused_unless_accepted() {
    use async_nats::jetstream::stream;
    let env = TestEnv::new().await;
    let js = env.jetstream().await;
    js.create_stream(stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.prefix)],
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(3600),
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let config = env.config().build().unwrap();
    let error = edupulse_events::EventService::connect(config)
        .await
        .expect_err("a lossy stream");
    assert_eq!(
        error.kind(),
        edupulse_events::ConnectErrorKind::StreamConflict
    );
    let message = error.to_string();
    for word in ["memory", "max_age", "allow_lossy_stream"] {
        assert!(message.contains(word), "{word}: {message}");
    }
    let accepted = env.config().allow_lossy_stream(true).build().unwrap();
    edupulse_events::EventService::connect(accepted)
        .await
        .expect("accepted explicitly");
}
