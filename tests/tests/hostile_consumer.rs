//! A hostile, shared world on the consuming side: messages no emitter of ours wrote,
//! handlers that panic, old event ids, a pool too small for the handlers.

use edupulse_events::{
    ConsumerSettings, DeadReason, DomainEvent, EventService, HandlerError, Received,
};
use edupulse_events_tests::{wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
}

/// An event whose `Deserialize` panics on a negative id (user code the consumer calls).
#[derive(Debug, Clone, PartialEq, Serialize, DomainEvent)]
#[event(name = "quiz.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: i64,
}

impl<'de> Deserialize<'de> for QuizSubmitted {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            quiz_id: i64,
        }
        let raw = Raw::deserialize(deserializer)?;
        assert!(raw.quiz_id >= 0, "a user Deserialize that panics");
        Ok(QuizSubmitted {
            quiz_id: raw.quiz_id,
        })
    }
}

/// One subject per lesson: events of different lessons go to different lanes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.viewed", subject = "lesson.{lesson_id}.viewed")]
pub struct LessonViewed {
    pub lesson_id: i64,
}

const WAIT: Duration = Duration::from_secs(60);

fn fast() -> ConsumerSettings {
    ConsumerSettings {
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        ack_wait: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(10),
        max_deliveries: 3,
        ..ConsumerSettings::default()
    }
}

async fn effects(service: &EventService) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(service.pool())
        .await
        .unwrap()
}

async fn setup() -> (TestEnv, EventService) {
    let env = TestEnv::new().await;
    let service = env.service().await;
    sqlx::query("CREATE TABLE effects (event_id UUID NOT NULL)")
        .execute(service.pool())
        .await
        .unwrap();
    (env, service)
}

fn record<'c>(
    tx: &'c mut sqlx::PgConnection,
    id: Uuid,
) -> futures::future::BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    })
}

fn event_headers(id: Uuid, name: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", id.to_string().as_str());
    headers.insert("ce-type", name);
    headers.insert("ce-source", "someone-else");
    headers
}

#[tokio::test]
async fn a_foreign_message_with_nul_bytes_is_dead_lettered_losslessly_and_the_group_goes_on() {
    let (env, service) = setup().await;
    let js = env.jetstream().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<LessonPublished, _>(|tx, received| record(tx, received.envelope.id))
        .start()
        .await
        .unwrap();
    let subject = format!("{}.lesson.published", env.prefix);
    let mut headers = event_headers(Uuid::now_v7(), "lesson.published");
    headers.insert("x-note", "nul\u{0}inside");
    js.publish_with_headers(subject, headers, "{\"lesson_id\": \"\u{0}\"".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let id = service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    wait_for(WAIT, "the event behind the poison message", || async {
        consumer.handled() == 1
    })
    .await;
    let dead = service.dead_letters("grading", 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, DeadReason::Undecodable);
    assert_eq!(dead[0].payload, b"{\"lesson_id\": \"\x00\"");
    let raw: Vec<u8> = sqlx::query_scalar("SELECT raw_headers FROM edupulse.dead_letters")
        .fetch_one(service.pool())
        .await
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.contains("x-note: nul\u{0}inside"), "{raw:?}");
    let readable: String = sqlx::query_scalar("SELECT headers::text FROM edupulse.dead_letters")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert!(readable.contains("x-note"), "{readable}");
    assert_eq!(effects(&service).await, 1);
    let _ = id;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_handler_is_retried_then_dead_lettered_and_the_group_goes_on() {
    let (_env, service) = setup().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on::<LessonPublished, _, _>(move |received: Received<LessonPublished>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                if received.event.lesson_id == 1 {
                    panic!("a handler bug");
                }
                Ok(())
            }
        })
        .on::<QuizSubmitted, _, _>(|_: Received<QuizSubmitted>| async { Ok(()) })
        .start()
        .await
        .unwrap();
    service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    // A user Deserialize that panics (the derive's Serialize writes -1 as it is).
    service.emit(QuizSubmitted { quiz_id: -1 }).await.unwrap();
    service
        .emit(LessonPublished { lesson_id: 2 })
        .await
        .unwrap();
    wait_for(WAIT, "the event after the panics", || async {
        consumer.handled() == 1 && consumer.dead_lettered() == 2
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3 + 1,
        "three deliveries, then the next"
    );
    let dead = service.dead_letters("grading", 10).await.unwrap();
    let reasons: Vec<DeadReason> = dead.iter().map(|d| d.reason).collect();
    assert_eq!(
        reasons,
        [DeadReason::HandlerPanicked, DeadReason::HandlerPanicked]
    );
    assert!(dead[0].error.contains("a handler bug"), "{}", dead[0].error);
    assert!(
        dead[1].error.contains("a user Deserialize that panics"),
        "{}",
        dead[1].error
    );
    assert!(!consumer.is_finished());
    consumer.shutdown().await.expect("a clean shutdown");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_event_id_thirty_days_old_delivered_twice_is_applied_once() {
    let (env, service) = setup().await;
    let js = env.jetstream().await;
    let month_ago = SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
    let since_epoch = month_ago.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let old = uuid::Builder::from_unix_timestamp_millis(since_epoch.as_millis() as u64, &[7; 10])
        .into_uuid();
    let subject = format!("{}.lesson.published", env.prefix);
    let publish = |copy: &'static str| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            let mut headers = event_headers(old, "lesson.published");
            // Two stream messages (their own Nats-Msg-Id), one event id.
            headers.insert("Nats-Msg-Id", copy);
            js.publish_with_headers(subject, headers, "{\"lesson_id\": 1}".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let start = || {
        service
            .consumer("grading")
            .settings(fast())
            .on_tx::<LessonPublished, _>(|tx, received| record(tx, received.envelope.id))
            .start()
    };
    publish("copy-1").await;
    let consumer = start().await.unwrap();
    wait_for(WAIT, "the first copy", || async { consumer.handled() == 1 }).await;
    consumer.shutdown().await.unwrap();
    // A new instance prunes the inbox at its start; the second copy comes after.
    publish("copy-2").await;
    let consumer = start().await.unwrap();
    wait_for(WAIT, "the second copy", || async {
        consumer.duplicates() + consumer.handled() == 1
    })
    .await;
    assert_eq!(consumer.duplicates(), 1, "the second copy is a duplicate");
    assert_eq!(effects(&service).await, 1);
    consumer.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_message_of_an_unknown_type_keeps_its_event_id_in_the_dead_letter() {
    let (env, service) = setup().await;
    let js = env.jetstream().await;
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<LessonPublished, _>(|tx, received| record(tx, received.envelope.id))
        .start()
        .await
        .unwrap();
    let id = Uuid::now_v7();
    js.publish_with_headers(
        format!("{}.lesson.published", env.prefix),
        event_headers(id, "lesson.renamed"),
        "{}".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for(WAIT, "the dead letter", || async {
        consumer.dead_lettered() == 1
    })
    .await;
    let dead = service.dead_letters("grading", 10).await.unwrap();
    assert_eq!(dead[0].reason, DeadReason::UnknownEvent);
    assert_eq!(dead[0].event_id, Some(id));
    assert_eq!(dead[0].event_name.as_deref(), Some("lesson.renamed"));
    consumer.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_handler_that_emits_with_the_pool_exhausted_is_not_blamed_and_the_event_is_handled() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");
    // The consumer's service has a pool of two, which the test takes for a while: the
    // handlers' own emits time out waiting for a connection.
    let small = env
        .service_with(
            env.config()
                .max_connections(2)
                .connect_timeout(Duration::from_millis(300)),
        )
        .await;
    let emitter = small.clone();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let consumer = small
        .consumer("grading")
        .settings(ConsumerSettings {
            concurrency: 4,
            max_deliveries: 1,
            ..fast()
        })
        .on::<LessonViewed, _, _>(move |received: Received<LessonViewed>| {
            let (emitter, seen) = (emitter.clone(), seen.clone());
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                if received.event.lesson_id < 1_000 {
                    emitter
                        .emit(LessonViewed {
                            lesson_id: received.event.lesson_id + 1_000,
                        })
                        .await?;
                }
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let held = (
        small.pool().acquire().await.unwrap(),
        small.pool().acquire().await.unwrap(),
    );
    for lesson_id in 0..20 {
        service.emit(LessonViewed { lesson_id }).await.unwrap();
    }
    wait_for(WAIT, "handlers to try while the pool is taken", || async {
        calls.load(Ordering::SeqCst) >= 8
    })
    .await;
    assert_eq!(consumer.handled(), 0);
    drop(held);
    wait_for(WAIT, "every event and every emitted one", || async {
        consumer.handled() == 40
    })
    .await;
    assert_eq!(
        consumer.dead_lettered(),
        0,
        "{:?}",
        service.dead_letters("grading", 5).await
    );
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_instance_whose_lane_dies_fails_visibly_and_its_messages_come_back() {
    let (_env, service) = setup().await;
    let relay = service.start_relay().await.expect("the relay starts");
    // Long enough that the message's redelivery (which finds the dead lane) comes
    // well after the failure must have been seen.
    let ack_wait = Duration::from_secs(8);
    let start = || {
        service
            .consumer("grading")
            .settings(ConsumerSettings { ack_wait, ..fast() })
            .on_tx::<LessonPublished, _>(|tx, received| record(tx, received.envelope.id))
            .start()
    };
    let broken = start().await.unwrap();
    broken.panic_in_next_lane();
    service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    let failure = tokio::time::timeout(ack_wait / 2, broken.failed())
        .await
        .expect("the failure is seen as the lane dies, not at the next message");
    assert_eq!(failure.kind(), edupulse_events::ConsumerErrorKind::Failed);
    assert!(broken.failure().is_some());
    wait_for(WAIT, "the failed instance to stop", || async {
        broken.is_finished()
    })
    .await;
    let error = broken
        .shutdown()
        .await
        .expect_err("shutdown reports the failure");
    assert!(error.to_string().contains("lane"), "{error}");
    // Its message was not acked: a new instance handles it.
    let healthy = start().await.unwrap();
    wait_for(WAIT, "the message to come back", || async {
        healthy.handled() == 1
    })
    .await;
    assert_eq!(effects(&service).await, 1);
    healthy.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn messages_with_headers_no_client_can_parse_become_undeliverable_dead_letters() {
    let (env, service) = setup().await;
    let relay = service.start_relay().await.expect("the relay starts");
    // Such a message drops the connection it arrives on, so the group never sees it:
    // JetStream gives it up after `max_redeliveries`, and the group records it raw.
    let consumer = service
        .consumer("grading")
        .settings(ConsumerSettings {
            ack_wait: Duration::from_secs(1),
            max_redeliveries: 2,
            ..fast()
        })
        .on_tx::<LessonPublished, _>(|tx, received| record(tx, received.envelope.id))
        .start()
        .await
        .unwrap();
    let subject = format!("{}.lesson.published", env.prefix);
    let blocks = [
        "NATS/1.0\r\nx: a\rb\r\n\r\n",
        "NATS/1.0\r\nBad Name: x\r\n\r\n",
        "NATS/1.0\r\nno colon here\r\n\r\n",
        "NATS/1.0\r\nN\u{e4}me: x\r\n\r\n",
    ];
    for block in blocks {
        edupulse_events_tests::raw_hpub(&env.nats_url, &subject, block, "garbage").await;
    }
    wait_for(WAIT, "four undeliverable dead letters", || async {
        service
            .dead_letters("grading", 10)
            .await
            .unwrap()
            .iter()
            .filter(|d| d.reason == DeadReason::Undeliverable)
            .count()
            == 4
    })
    .await;
    let raw: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT raw_headers FROM edupulse.dead_letters ORDER BY stream_sequence",
    )
    .fetch_all(service.pool())
    .await
    .unwrap();
    let raw: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
    let expected: Vec<&[u8]> = blocks.iter().map(|b| b.as_bytes()).collect();
    assert_eq!(raw, expected, "kept as the stream holds them");
    // The group goes on.
    service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    wait_for(
        WAIT,
        "the event after the undeliverable messages",
        || async { consumer.handled() == 1 },
    )
    .await;
    assert_eq!(effects(&service).await, 1);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn events_read_with_an_unparseable_message_are_handled_in_order_and_not_given_up() {
    let (env, service) = setup().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let subject = format!("{}.lesson.published", env.prefix);
    let js = env.jetstream().await;
    let emit = |from: i64| {
        let service = service.clone();
        async move {
            for lesson_id in from..from + 5 {
                service.emit(LessonPublished { lesson_id }).await.unwrap();
            }
        }
    };
    // Five events, a message no client can parse, five more: one pull reads them all.
    emit(1).await;
    wait_for(WAIT, "the first five events in the stream", || async {
        env.stream_len(&js).await == 5
    })
    .await;
    let poison = "NATS/1.0\r\nBad Name: x\r\n\r\n";
    edupulse_events_tests::raw_hpub(&env.nats_url, &subject, poison, "garbage").await;
    emit(6).await;
    wait_for(WAIT, "all eleven messages in the stream", || async {
        env.stream_len(&js).await == 11
    })
    .await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = order.clone();
    // The message drops the connection it arrives on, with the events after it in the
    // same pull. Before, they came back with it after every ack_wait and were given up
    // with it after max_redeliveries.
    let consumer = service
        .consumer("grading")
        .settings(ConsumerSettings {
            ack_wait: Duration::from_secs(2),
            max_redeliveries: 3,
            ..fast()
        })
        .on_tx::<LessonPublished, _>(move |tx, received| {
            seen.lock().unwrap().push(received.event.lesson_id);
            record(tx, received.envelope.id)
        })
        .start()
        .await
        .unwrap();
    wait_for(WAIT, "the ten events handled", || async {
        consumer.handled() == 10
    })
    .await;
    assert_eq!(*order.lock().unwrap(), (1..=10).collect::<Vec<_>>());
    assert_eq!(effects(&service).await, 10);
    let dead = service.dead_letters("grading", 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, DeadReason::Undeliverable);
    assert_eq!(dead[0].stream_sequence, 6);
    let raw: Vec<u8> = sqlx::query_scalar("SELECT raw_headers FROM edupulse.dead_letters")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(raw, poison.as_bytes());
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn messages_an_instance_has_when_its_client_dies_go_on_with_the_next_client() {
    let (env, service) = setup().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    // Ten events of one lesson: one lane takes them, in order.
    for _ in 0..10 {
        service.emit(LessonViewed { lesson_id: 1 }).await.unwrap();
    }
    wait_for(WAIT, "the ten events in the stream", || async {
        env.stream_len(&js).await == 10
    })
    .await;
    // The first one's handler waits until the client has died: the other nine are then
    // queued in its lane.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (gate, seen) = (release.clone(), attempts.clone());
    let consumer = service
        .consumer("grading")
        .settings(ConsumerSettings {
            ack_wait: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(30),
            ..fast()
        })
        .on_tx::<LessonViewed, _>(move |tx, received| {
            let first = {
                let mut seen = seen.lock().unwrap();
                seen.push(received.envelope.attempt);
                seen.len() == 1
            };
            let gate = gate.clone();
            Box::pin(async move {
                if first {
                    let _ = gate.acquire().await;
                }
                record(tx, received.envelope.id).await
            })
        })
        .start()
        .await
        .unwrap();
    let group = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "grading",
            env.stream.as_str(),
        )
        .await
        .unwrap();
    wait_for(WAIT, "the ten events delivered, the first in hand", || {
        let mut group = group.clone();
        let attempts = attempts.clone();
        async move {
            let info = group.info().await.unwrap();
            info.num_ack_pending == 10 && attempts.lock().unwrap().len() == 1
        }
    })
    .await;
    // A header value with a lone carriage return: async-nats's reader panics on it and
    // the instance's client dies.
    let subject = format!("{}.lesson.2.viewed", env.prefix);
    let poison = "NATS/1.0\r\nx: a\rb\r\n\r\n";
    edupulse_events_tests::raw_hpub(&env.nats_url, &subject, poison, "garbage").await;
    wait_for(WAIT, "the client's death", || async {
        consumer.clients_lost() == 1
    })
    .await;
    release.add_permits(1);
    wait_for(WAIT, "the ten events handled", || async {
        consumer.handled() == 10
    })
    .await;
    wait_for(WAIT, "the poison recorded", || async {
        consumer.dead_lettered() == 1
    })
    .await;
    assert_eq!(effects(&service).await, 10);
    // The nine queued ones went on with the next client: handled once, acked through
    // it, never delivered again. (Only the one in hand, whose ack went to the dead
    // client, comes back, as a duplicate.) Before, each came back after ack_wait.
    assert_eq!(*attempts.lock().unwrap(), vec![1; 10]);
    wait_for(WAIT, "everything acked", || {
        let mut group = group.clone();
        async move { group.info().await.unwrap().num_ack_pending == 0 }
    })
    .await;
    let redelivered = consumer.duplicates();
    assert!(redelivered <= 1, "{redelivered} delivered again");
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_handler_that_never_finishes_is_abandoned_at_handler_timeout_and_the_subject_goes_on() {
    let (_env, service) = setup().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let consumer = service
        .consumer("grading")
        .settings(ConsumerSettings {
            handler_timeout: Duration::from_millis(300),
            max_deliveries: 2,
            ..fast()
        })
        .on_tx::<LessonPublished, _>(|tx, received| {
            Box::pin(async move {
                if received.event.lesson_id == 1 {
                    // Stuck for ever (a call that never answers), holding the transaction.
                    std::future::pending::<()>().await;
                }
                record(tx, received.envelope.id).await
            })
        })
        .start()
        .await
        .unwrap();
    service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    service
        .emit(LessonPublished { lesson_id: 2 })
        .await
        .unwrap();
    wait_for(WAIT, "the event behind the stuck one", || async {
        consumer.handled() == 1 && consumer.dead_lettered() == 1
    })
    .await;
    let dead = service.dead_letters("grading", 10).await.unwrap();
    assert_eq!(dead[0].reason, DeadReason::HandlerFailed);
    assert!(
        dead[0].error.contains("handler_timeout"),
        "{}",
        dead[0].error
    );
    assert_eq!(
        effects(&service).await,
        1,
        "the stuck handler's transaction rolled back"
    );
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}
