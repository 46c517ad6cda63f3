//! Consumer groups against the real Postgres and NATS: retries, the exactly-once inbox,
//! dead letters, shutdown under load, and two instances sharing a group.

use edupulse_events::{
    ConsumerSettings, DeadReason, DomainEvent, EventService, HandlerError, Received, RelayHandle,
    StartFrom,
};
use edupulse_events_tests::{wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 2,
    subject = "quiz.{quiz_id}.submitted"
)]
pub struct QuizSubmitted {
    pub quiz_id: String,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded")]
pub struct QuizGraded {
    pub quiz_id: String,
}

const WAIT: Duration = Duration::from_secs(30);

fn fast() -> ConsumerSettings {
    ConsumerSettings {
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ack_wait: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(10),
        ..ConsumerSettings::default()
    }
}

struct Setup {
    env: TestEnv,
    service: EventService,
    relay: RelayHandle,
}

async fn setup() -> Setup {
    let env = TestEnv::new().await;
    let service = env.service().await;
    sqlx::query("CREATE TABLE effects (event_id UUID NOT NULL, note TEXT NOT NULL)")
        .execute(service.pool())
        .await
        .unwrap();
    let relay = service.start_relay().await.expect("the relay starts");
    Setup {
        env,
        service,
        relay,
    }
}

async fn count(service: &EventService, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(service.pool())
        .await
        .unwrap()
}

/// An `on_tx` handler that records its effect in `effects`.
fn record_effect<'c>(
    tx: &'c mut sqlx::PgConnection,
    id: Uuid,
    note: String,
) -> futures::future::BoxFuture<'c, Result<(), HandlerError>> {
    Box::pin(async move {
        sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, $2)")
            .bind(id)
            .bind(note)
            .execute(&mut *tx)
            .await?;
        Ok(())
    })
}

#[tokio::test]
async fn a_handler_failing_twice_is_delivered_three_times_and_applied_once() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<LessonPublished, _>(move |tx, received| {
            let seen = seen.clone();
            Box::pin(async move {
                seen.lock().unwrap().push(received.envelope.attempt);
                sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, 'applied')")
                    .bind(received.envelope.id)
                    .execute(&mut *tx)
                    .await?;
                if received.envelope.attempt < 3 {
                    // The effect above rolls back with the failure.
                    return Err(format!("transient failure {}", received.envelope.attempt).into());
                }
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    let id = service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    wait_for(WAIT, "the event to be handled", || async {
        consumer.handled() == 1
    })
    .await;
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE event_id = $1")
        .bind(id)
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(effects, 1);
    assert_eq!(consumer.dead_lettered(), 0);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn received_carries_the_envelope_and_emitted_events_carry_the_cause() {
    let Setup {
        service,
        relay,
        env,
    } = setup().await;
    let got = Arc::new(Mutex::new(None));
    let sink = got.clone();
    let emitter = service.clone();
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<QuizSubmitted, _>(move |tx, received| {
            let sink = sink.clone();
            let emitter = emitter.clone();
            Box::pin(async move {
                let graded = emitter
                    .emit_in(
                        tx,
                        QuizGraded {
                            quiz_id: received.event.quiz_id.clone(),
                        },
                    )
                    .await?;
                *sink.lock().unwrap() = Some((received, graded));
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    let correlation = Uuid::now_v7();
    let id = service
        .emit(
            edupulse_events::Outgoing::new(QuizSubmitted {
                quiz_id: "q7".into(),
                score: 0.75,
            })
            .correlation_id(correlation),
        )
        .await
        .unwrap();
    wait_for(WAIT, "the event to be handled", || async {
        consumer.handled() == 1
    })
    .await;
    let (received, graded) = got.lock().unwrap().clone().expect("handled");
    assert_eq!(received.event.quiz_id, "q7");
    let envelope = &received.envelope;
    assert_eq!(envelope.id, id);
    assert_eq!(envelope.name, "quiz.submitted");
    assert_eq!(envelope.version, 2);
    assert_eq!(envelope.source, "edupulse-tests");
    assert_eq!(
        envelope.subject,
        format!("{}.quiz.q7.submitted", env.prefix)
    );
    assert_eq!(envelope.correlation_id, Some(correlation));
    assert_eq!(envelope.attempt, 1);
    assert!(envelope.stream_sequence >= 1);

    let row: (Option<Uuid>, Option<Uuid>) =
        sqlx::query_as("SELECT causation_id, correlation_id FROM edupulse.outbox WHERE id = $1")
            .bind(graded)
            .fetch_one(service.pool())
            .await
            .unwrap();
    assert_eq!(row, (Some(id), Some(correlation)));
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_same_event_published_again_past_the_duplicate_window_is_applied_once() {
    let env = TestEnv::new().await;
    let service = env
        .service_with(env.config().duplicate_window(Duration::from_millis(200)))
        .await;
    sqlx::query("CREATE TABLE effects (event_id UUID NOT NULL, note TEXT NOT NULL)")
        .execute(service.pool())
        .await
        .unwrap();
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    let id = service
        .emit(LessonPublished { lesson_id: 5 })
        .await
        .unwrap();
    wait_for(WAIT, "the event in the stream", || async {
        env.stream_len(&js).await == 1
    })
    .await;

    // Publish the very same message again until JetStream no longer calls it a duplicate.
    let original = env.stream_messages(&js).await.remove(0);
    wait_for(WAIT, "a copy past the duplicate window", || async {
        let ack = js
            .publish_with_headers(
                original.subject.clone(),
                original.headers.clone().unwrap_or_default(),
                original.payload.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        !ack.duplicate
    })
    .await;
    assert_eq!(env.stream_len(&js).await, 2);

    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let consumer = service
        .consumer("indexer")
        .settings(fast())
        .on_tx::<LessonPublished, _>(move |tx, received| {
            counter.fetch_add(1, Ordering::SeqCst);
            record_effect(tx, received.envelope.id, "indexed".into())
        })
        .start()
        .await
        .unwrap();
    wait_for(WAIT, "both copies to be consumed", || async {
        consumer.handled() + consumer.duplicates() == 2
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(consumer.duplicates(), 1);
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE event_id = $1")
        .bind(id)
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(effects, 1);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn dying_after_commit_before_ack_still_applies_the_effect_once() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let start = |service: &EventService| {
        service
            .consumer("indexer")
            .settings(fast())
            .on_tx::<LessonPublished, _>(|tx, received| {
                record_effect(tx, received.envelope.id, "indexed".into())
            })
            .start()
    };
    let doomed = start(&service).await.unwrap();
    doomed.crash_after_commit();
    let id = service
        .emit(LessonPublished { lesson_id: 9 })
        .await
        .unwrap();
    wait_for(WAIT, "the doomed instance to commit and die", || async {
        doomed.is_finished()
    })
    .await;
    doomed.shutdown().await.unwrap();
    let effects = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM effects WHERE event_id = $1")
            .bind(id)
            .fetch_one(service.pool())
            .await
            .unwrap()
    };
    assert_eq!(effects().await, 1, "committed before the crash");

    // The unacked message comes back after ack_wait; the inbox skips it.
    let next = start(&service).await.unwrap();
    wait_for(WAIT, "the redelivery to be skipped", || async {
        next.duplicates() == 1
    })
    .await;
    assert_eq!(next.handled(), 0);
    assert_eq!(effects().await, 1);
    next.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_the_rest_keep_flowing() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let handled = Arc::new(Mutex::new(Vec::new()));
    let sink = handled.clone();
    let consumer = service
        .consumer("grading")
        .settings(ConsumerSettings {
            max_deliveries: 3,
            ..fast()
        })
        .on::<LessonPublished, _, _>(move |received: Received<LessonPublished>| {
            let sink = sink.clone();
            async move {
                if received.event.lesson_id == 2 {
                    return Err("lesson 2 is poison".into());
                }
                sink.lock().unwrap().push(received.event.lesson_id);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let ids = service
        .emit_all((1..=4).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    wait_for(WAIT, "the healthy events to be handled", || async {
        consumer.handled() == 3
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), vec![1, 3, 4], "in stream order");
    let dead = service.dead_letters("grading", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::HandlerFailed);
    assert_eq!(dead[0].event_id, Some(ids[1]));
    assert_eq!(dead[0].deliveries, 3);
    assert!(dead[0].error.contains("poison"), "{}", dead[0].error);
    let payload: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(payload["lesson_id"], 2);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn undecodable_and_unknown_messages_go_to_dead_letters_with_a_reason() {
    let Setup {
        env,
        service,
        relay,
    } = setup().await;
    let js = env.jetstream().await;
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<LessonPublished, _>(|tx, received| {
            record_effect(tx, received.envelope.id, "ok".into())
        })
        .on::<QuizSubmitted, _, _>(|_: Received<QuizSubmitted>| async { Ok(()) })
        .start()
        .await
        .unwrap();
    let subject = format!("{}.lesson.published", env.prefix);
    let headers = |name: &str, version: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("ce-specversion", "1.0");
        h.insert("ce-id", Uuid::now_v7().to_string().as_str());
        h.insert("ce-type", name);
        h.insert("ce-eventversion", version);
        h
    };
    let publish = |headers: async_nats::HeaderMap, body: &'static [u8]| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            js.publish_with_headers(subject, headers, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish(headers("lesson.published", "1"), b"{not json").await;
    publish(
        headers("lesson.published", "1"),
        br#"{"lesson_id": "seven"}"#,
    )
    .await;
    publish(headers("lesson.published", "99"), br#"{"lesson_id": 7}"#).await;
    publish(headers("lesson.deleted", "1"), br#"{"lesson_id": 7}"#).await;
    publish(async_nats::HeaderMap::new(), br#"{"lesson_id": 7}"#).await;
    // A healthy event behind them still flows.
    service
        .emit(LessonPublished { lesson_id: 8 })
        .await
        .unwrap();
    wait_for(WAIT, "the healthy event", || async {
        consumer.handled() == 1
    })
    .await;
    wait_for(WAIT, "five dead letters", || async {
        consumer.dead_lettered() == 5
    })
    .await;
    let dead = service.dead_letters("grading", 10).await.unwrap();
    let reasons: Vec<DeadReason> = dead.iter().map(|d| d.reason).collect();
    assert_eq!(
        reasons,
        [
            DeadReason::Undecodable,
            DeadReason::Undecodable,
            DeadReason::UnknownVersion,
            DeadReason::UnknownEvent,
            DeadReason::Undecodable
        ]
    );
    assert!(
        dead[0].error.contains("does not decode"),
        "{}",
        dead[0].error
    );
    assert!(dead[2].error.contains("version 99"), "{}", dead[2].error);
    assert!(
        dead[3].error.contains("lesson.deleted"),
        "{}",
        dead[3].error
    );
    assert!(dead[4].error.contains("ce-type"), "{}", dead[4].error);
    assert_eq!(dead[0].payload, b"{not json");
    assert!(
        dead.iter().all(|d| d.deliveries == 1),
        "dead-lettered at once"
    );
    assert_eq!(count(&service, "SELECT count(*) FROM effects").await, 1);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// Holds `on_tx` handlers in the middle of their transaction while paused, so that a
/// test can shut an instance down with handlers in flight at a point it chooses.
struct Pause {
    paused: AtomicBool,
    blocked: AtomicU32,
    resume: tokio::sync::Semaphore,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            paused: AtomicBool::new(false),
            blocked: AtomicU32::new(0),
            resume: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Pause {
    async fn point(&self) {
        if self.paused.load(Ordering::SeqCst) {
            self.blocked.fetch_add(1, Ordering::SeqCst);
            if let Ok(permit) = self.resume.acquire().await {
                permit.forget();
            }
        }
    }

    fn release(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.resume.add_permits(1024);
    }
}

#[tokio::test]
async fn shutdown_under_load_loses_nothing_and_leaves_nothing_half_applied() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let start = |service: &EventService, pause: Arc<Pause>| {
        service
            .consumer("indexer")
            .settings(ConsumerSettings {
                concurrency: 4,
                ..fast()
            })
            .on_tx::<QuizSubmitted, _>(move |tx, received| {
                let pause = pause.clone();
                Box::pin(async move {
                    sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, 'first')")
                        .bind(received.envelope.id)
                        .execute(&mut *tx)
                        .await?;
                    pause.point().await;
                    sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, 'second')")
                        .bind(received.envelope.id)
                        .execute(&mut *tx)
                        .await?;
                    Ok(())
                })
            })
            .start()
    };
    service
        .emit_all((0..600).map(|i| QuizSubmitted {
            quiz_id: format!("q{}", i % 17),
            score: 1.0,
        }))
        .await
        .unwrap();
    let pause = Arc::new(Pause::default());
    let first = start(&service, pause.clone()).await.unwrap();
    wait_for(WAIT, "some events to be handled", || async {
        first.handled() >= 60
    })
    .await;
    // Catch handlers between their two inserts, stop the instance, then let them go on:
    // they finish, and the queued events are handed back.
    pause.paused.store(true, Ordering::SeqCst);
    wait_for(WAIT, "a handler in flight, half-way", || async {
        pause.blocked.load(Ordering::SeqCst) >= 1
    })
    .await;
    first.begin_shutdown();
    pause.release();
    first.shutdown().await.unwrap();
    let inbox = count(&service, "SELECT count(*) FROM edupulse.inbox").await;
    let effects = count(&service, "SELECT count(*) FROM effects").await;
    assert!(inbox < 600, "shut down before the end ({inbox})");
    assert_eq!(
        effects,
        inbox * 2,
        "every handled event has both effects, no other has any"
    );

    let second = start(&service, Arc::new(Pause::default())).await.unwrap();
    wait_for(WAIT, "every event to be handled", || async {
        count(&service, "SELECT count(*) FROM edupulse.inbox").await == 600
    })
    .await;
    assert_eq!(count(&service, "SELECT count(*) FROM effects").await, 1200);
    assert_eq!(
        count(&service, "SELECT count(DISTINCT event_id) FROM effects").await,
        600
    );
    second.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_instances_of_one_group_share_the_work_and_handle_each_event_once() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let other = {
        let config = service.config().clone();
        EventService::connect(config).await.unwrap()
    };
    let start = |service: &EventService| {
        service
            .consumer("indexer")
            .settings(ConsumerSettings {
                concurrency: 2,
                fetch_batch: 20,
                ..fast()
            })
            .on_tx::<QuizSubmitted, _>(|tx, received| {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, 'x')")
                        .bind(received.envelope.id)
                        .execute(&mut *tx)
                        .await?;
                    Ok(())
                })
            })
            .start()
    };
    let a = start(&service).await.unwrap();
    let b = start(&other).await.unwrap();
    let emit = |from: i64, n: i64| {
        service.emit_all((from..from + n).map(|i| QuizSubmitted {
            quiz_id: format!("q{}", i % 31),
            score: 0.5,
        }))
    };
    emit(0, 1000).await.unwrap();
    let mut emitted = 1000;
    // Both instances get work: while one has none, each time everything emitted is
    // handled, emit more, up to a deadline.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.handled() == 0 || b.handled() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both instances should get work within {WAIT:?}: {} {}",
            a.handled(),
            b.handled()
        );
        if count(&service, "SELECT count(*) FROM edupulse.inbox").await == emitted {
            emit(emitted, 200).await.unwrap();
            emitted += 200;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(WAIT, "every event to be handled", || async {
        count(&service, "SELECT count(*) FROM edupulse.inbox").await == emitted
    })
    .await;
    // Each event's effect once. The counters may say "duplicate" for one: a commit
    // whose answer came too late (a loaded machine) is retried and finds the event in
    // the inbox (seen once in a clean-clone run: 999 handled, 1,000 effects).
    let handled = a.handled() + b.handled();
    let duplicates = a.duplicates() + b.duplicates();
    assert!(handled <= emitted as u64, "{handled} handled of {emitted}");
    assert!(
        handled + duplicates >= emitted as u64,
        "{handled} handled and {duplicates} duplicates of {emitted}"
    );
    assert_eq!(
        count(&service, "SELECT count(*) FROM effects").await,
        emitted
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// How many messages group `group` has delivered and not acked, on the server.
async fn ack_pending(env: &TestEnv, js: &async_nats::jetstream::Context, group: &str) -> usize {
    let stream = js.get_stream(&env.stream).await.unwrap();
    stream
        .consumer_info(group)
        .await
        .map(|info| info.num_ack_pending)
        .unwrap_or(0)
}

/// Starts an `indexer` instance whose handler records each lesson id it is called
/// with, in call order, and its effect.
async fn start_recording(
    service: &EventService,
    settings: ConsumerSettings,
    calls: Arc<Mutex<Vec<i64>>>,
) -> edupulse_events::ConsumerHandle {
    service
        .consumer("indexer")
        .settings(settings)
        .on_tx::<LessonPublished, _>(move |tx, received| {
            calls.lock().unwrap().push(received.event.lesson_id);
            record_effect(tx, received.envelope.id, "indexed".into())
        })
        .start()
        .await
        .unwrap()
}

/// Starts an `indexer` instance that receives every event emitted, blocks in its first
/// handler until the group has delivered `expected` messages, commits that one event
/// and dies without acking or handing back anything.
async fn start_and_kill_holding(
    env: &TestEnv,
    service: &EventService,
    settings: ConsumerSettings,
    emit: impl Future<Output = ()>,
    expected: usize,
) {
    let js = env.jetstream().await;
    let go = Arc::new(tokio::sync::Notify::new());
    let doomed = {
        let go = go.clone();
        service
            .consumer("indexer")
            .settings(settings)
            .on_tx::<LessonPublished, _>(move |tx, received| {
                let go = go.clone();
                Box::pin(async move {
                    go.notified().await;
                    record_effect(tx, received.envelope.id, "doomed".into()).await
                })
            })
            .start()
            .await
            .unwrap()
    };
    doomed.crash_after_commit();
    emit.await;
    wait_for(
        WAIT,
        "the events delivered to the doomed instance",
        || async { ack_pending(env, &js, "indexer").await == expected },
    )
    .await;
    go.notify_one();
    wait_for(WAIT, "the doomed instance to commit and die", || async {
        doomed.is_finished()
    })
    .await;
    doomed.shutdown().await.unwrap();
}

/// Lessons 1-20, one subject, all delivered to an instance that commits lesson 1 and
/// dies: 2-20 stay pending on the server until ack_wait passes. Then lessons 21-30 of
/// the same subject, in the stream at once for the next instance.
async fn dead_instance_then_later_events(
    env: &TestEnv,
    service: &EventService,
    settings: ConsumerSettings,
) -> async_nats::jetstream::Context {
    let emit = async {
        service
            .emit_all((1..=20).map(|lesson_id| LessonPublished { lesson_id }))
            .await
            .unwrap();
    };
    start_and_kill_holding(env, service, settings, emit, 20).await;
    service
        .emit_all((21..=30).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    let js = env.jetstream().await;
    wait_for(WAIT, "the later events in the stream", || async {
        env.stream_len(&js).await == 30
    })
    .await;
    js
}

#[tokio::test]
async fn after_an_instance_dies_the_next_one_handles_each_subject_in_stream_order() {
    let Setup {
        service,
        relay,
        env,
    } = setup().await;
    dead_instance_then_later_events(&env, &service, fast()).await;

    let calls = Arc::new(Mutex::new(Vec::new()));
    let next = start_recording(&service, fast(), calls.clone()).await;
    wait_for(WAIT, "every event to be handled", || async {
        next.handled() == 29 && next.duplicates() == 1
    })
    .await;
    assert_eq!(
        *calls.lock().unwrap(),
        (2..=30).collect::<Vec<i64>>(),
        "the dead instance's events first, in stream order; lesson 1 was committed"
    );
    assert_eq!(count(&service, "SELECT count(*) FROM effects").await, 30);
    next.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutting_down_while_waiting_for_a_dead_instances_events_keeps_the_order() {
    let Setup {
        service,
        relay,
        env,
    } = setup().await;
    // A longer ack_wait leaves time to shut the next instance down while it waits.
    let settings = ConsumerSettings {
        ack_wait: Duration::from_secs(4),
        ..fast()
    };
    let js = dead_instance_then_later_events(&env, &service, settings.clone()).await;
    // An instance that receives the later events and holds them for the dead
    // instance's, shut down while it waits: it hands back what it holds, unhandled.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let waiting = start_recording(&service, settings.clone(), calls.clone()).await;
    wait_for(
        WAIT,
        "the later events delivered to the waiting instance",
        || async { ack_pending(&env, &js, "indexer").await == 30 || waiting.handled() > 0 },
    )
    .await;
    waiting.shutdown().await.unwrap();
    let before = calls.lock().unwrap().len();

    let next = start_recording(&service, settings, calls.clone()).await;
    wait_for(WAIT, "every event to be handled", || async {
        count(&service, "SELECT count(*) FROM effects").await == 30
    })
    .await;
    assert_eq!(
        *calls.lock().unwrap(),
        (2..=30).collect::<Vec<i64>>(),
        "in stream order over both instances ({before} by the one shut down)"
    );
    next.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_instance_joining_a_busy_group_shares_the_work_within_about_ack_wait() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let other = EventService::connect(service.config().clone())
        .await
        .unwrap();
    let start = |service: &EventService| {
        service
            .consumer("indexer")
            .settings(ConsumerSettings {
                fetch_batch: 20,
                ..fast()
            })
            .on_tx::<QuizSubmitted, _>(|tx, received| {
                Box::pin(async move {
                    // Work that takes a while, so that the group stays busy.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    record_effect(tx, received.envelope.id, "x".into()).await
                })
            })
            .start()
    };
    let a = start(&service).await.unwrap();
    let total = 1000;
    service
        .emit_all((0..total).map(|i| QuizSubmitted {
            quiz_id: format!("q{}", i % 13),
            score: 0.5,
        }))
        .await
        .unwrap();
    wait_for(WAIT, "the first instance to be busy", || async {
        a.handled() >= 20
    })
    .await;
    // The second instance sees the first one's unacked events; it may wait for them up
    // to ack_wait (2 s) and a margin, never for the whole backlog.
    let joined = tokio::time::Instant::now();
    let b = start(&other).await.unwrap();
    wait_for(WAIT, "the joining instance to handle events", || async {
        b.handled() > 0
    })
    .await;
    let waited = joined.elapsed();
    let handled = count(&service, "SELECT count(*) FROM edupulse.inbox").await;
    assert!(
        handled < total,
        "the joining instance got work while the backlog lasted (after {waited:?})"
    );
    assert!(
        waited < Duration::from_secs(10),
        "the joining instance waited {waited:?}"
    );
    wait_for(WAIT, "every event to be handled", || async {
        count(&service, "SELECT count(*) FROM edupulse.inbox").await == total
    })
    .await;
    assert_eq!(a.handled() + b.handled(), total as u64);
    assert_eq!(count(&service, "SELECT count(*) FROM effects").await, total);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_consumer_definitions_are_refused() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let noop = |_: Received<LessonPublished>| async { Ok::<(), HandlerError>(()) };
    let error = service.consumer("a.b").on(noop).start().await.unwrap_err();
    assert!(error.to_string().contains("invalid"), "{error}");
    let error = service.consumer("empty").start().await.unwrap_err();
    assert!(error.to_string().contains("no handler"), "{error}");
    let error = service
        .consumer("twice")
        .on(noop)
        .on(noop)
        .start()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("two handlers"), "{error}");
    let error = service
        .consumer("zero")
        .concurrency(0)
        .on(noop)
        .start()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("concurrency"), "{error}");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn events_waiting_in_a_lane_longer_than_ack_wait_are_not_redelivered() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    // One subject, one lane, a slow plain handler: the last events wait in the lane's
    // queue for several times ack_wait.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let consumer = service
        .consumer("slow")
        .settings(ConsumerSettings {
            ack_wait: Duration::from_secs(1),
            fetch_batch: 20,
            ..fast()
        })
        .on::<LessonPublished, _, _>(move |received: Received<LessonPublished>| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push((received.event.lesson_id, received.envelope.attempt));
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    service
        .emit_all((0..30).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    wait_for(WAIT, "every event handled", || async {
        consumer.handled() >= 30
    })
    .await;
    consumer.shutdown().await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let expected: Vec<(i64, u32)> = (0..30).map(|lesson_id| (lesson_id, 1)).collect();
    assert_eq!(calls, expected, "each once, first delivery, in order");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_new_group_starting_at_new_events_handles_them_at_once() {
    let Setup {
        service,
        relay,
        env,
    } = setup().await;
    service
        .emit_all((0..10).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    let js = env.jetstream().await;
    wait_for(WAIT, "the earlier events in the stream", || async {
        env.stream_len(&js).await == 10
    })
    .await;
    // The server reports such a group as delivered up to the stream's end with an ack
    // floor of 0: nothing is waiting for an ack, so there is nothing to wait for.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let late = start_recording(
        &service,
        ConsumerSettings {
            start_from: StartFrom::New,
            ack_wait: Duration::from_secs(20),
            ..fast()
        },
        calls.clone(),
    )
    .await;
    service
        .emit(LessonPublished { lesson_id: 10 })
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the new event, well before ack_wait (20 s)",
        || async { late.handled() == 1 },
    )
    .await;
    assert_eq!(*calls.lock().unwrap(), vec![10]);
    late.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// A named `async fn` handler for [`ConsumerBuilder::on_tx_fn`]: no `Box::pin`.
async fn apply_lesson(
    tx: &mut sqlx::PgConnection,
    received: Received<LessonPublished>,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, $2)")
        .bind(received.envelope.id)
        .bind(format!("lesson {}", received.event.lesson_id))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_async_fn_is_an_on_tx_handler_and_applies_each_event_once() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let consumer = service
        .consumer("indexer")
        .settings(fast())
        .on_tx_fn(apply_lesson)
        .start()
        .await
        .expect("start");
    for lesson_id in 0..5 {
        service.emit(LessonPublished { lesson_id }).await.unwrap();
    }
    wait_for(WAIT, "five effects", || async {
        count(&service, "SELECT count(*) FROM effects").await == 5
    })
    .await;
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM effects ORDER BY note")
        .fetch_all(service.pool())
        .await
        .unwrap();
    assert_eq!(
        notes,
        (0..5).map(|n| format!("lesson {n}")).collect::<Vec<_>>()
    );
    assert_eq!(
        count(
            &service,
            "SELECT count(*) FROM edupulse.inbox WHERE consumer_group = 'indexer'"
        )
        .await,
        5
    );
    consumer.shutdown().await.expect("consumer");
    relay.shutdown().await.expect("relay");
}

#[tokio::test]
async fn a_consumer_reports_the_failure_it_is_retrying_until_an_event_goes_through() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let fail = Arc::new(AtomicBool::new(true));
    let failing = fail.clone();
    let consumer = service
        .consumer("reporting")
        .settings(fast())
        .max_deliveries(10_000)
        .on(move |_: Received<LessonPublished>| {
            let failing = failing.clone();
            async move {
                if failing.load(Ordering::SeqCst) {
                    return Err("the mail server said no".into());
                }
                Ok(())
            }
        })
        .start()
        .await
        .expect("start");
    assert_eq!(consumer.status(), edupulse_events::ConsumerStatus::Running);
    service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    wait_for(WAIT, "the failure to be reported", || async {
        matches!(
            consumer.status(),
            edupulse_events::ConsumerStatus::Failing(_)
        )
    })
    .await;
    let error = consumer.last_error().expect("the last error");
    assert!(error.contains("the mail server said no"), "{error}");
    assert!(error.contains("lesson.published"), "{error}");
    fail.store(false, Ordering::SeqCst);
    wait_for(WAIT, "the event to go through", || async {
        consumer.handled() == 1
    })
    .await;
    assert_eq!(consumer.status(), edupulse_events::ConsumerStatus::Running);
    assert_eq!(consumer.last_error(), None);
    consumer.shutdown().await.expect("consumer");
    relay.shutdown().await.expect("relay");
}

/// Consume, write, emit: the grade and the event it causes commit together.
async fn grade_and_emit(
    tx: &mut sqlx::PgConnection,
    received: Received<QuizSubmitted>,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, 'graded')")
        .bind(received.envelope.id)
        .execute(&mut *tx)
        .await?;
    received
        .emit_in(
            tx,
            QuizGraded {
                quiz_id: received.event.quiz_id.clone(),
            },
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_handler_emits_through_what_it_received_caused_by_it() {
    let Setup {
        service,
        relay,
        env: _env,
    } = setup().await;
    let consumer = service
        .consumer("grading")
        .settings(fast())
        .on_tx_fn(grade_and_emit)
        .start()
        .await
        .expect("start");
    let submitted = service
        .emit(QuizSubmitted {
            quiz_id: "q1".into(),
            score: 0.5,
        })
        .await
        .unwrap();
    wait_for(WAIT, "the graded event", || async {
        count(
            &service,
            "SELECT count(*) FROM edupulse.outbox WHERE name = 'quiz.graded'",
        )
        .await
            == 1
    })
    .await;
    let (causation, correlation): (Option<Uuid>, Option<Uuid>) = sqlx::query_as(
        "SELECT causation_id, correlation_id FROM edupulse.outbox WHERE name = 'quiz.graded'",
    )
    .fetch_one(service.pool())
    .await
    .unwrap();
    assert_eq!(causation, Some(submitted));
    assert_eq!(correlation, Some(submitted));
    assert_eq!(count(&service, "SELECT count(*) FROM effects").await, 1);
    consumer.shutdown().await.expect("consumer");
    relay.shutdown().await.expect("relay");
}
