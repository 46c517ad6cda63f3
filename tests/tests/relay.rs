//! The relay under failure, against real servers: NATS down, a relay dying between
//! ack and mark, several relays at once, a killed leader connection and a killed
//! LISTEN connection.

use edupulse_events::{
    ConsumerErrorKind, DomainEvent, EventService, EventState, OutboxError, RelayError,
    RelaySettings, RelayStatus, Requeue,
};
use edupulse_events_tests::{wait_for, NatsServer, TestEnv};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{writer}.submitted")]
pub struct QuizSubmitted {
    pub writer: u32,
    pub counter: u32,
}

fn quiz(writer: u32, counter: u32) -> QuizSubmitted {
    QuizSubmitted { writer, counter }
}

const WAIT: Duration = Duration::from_secs(60);

/// The ids of the outbox in sequence order (published or not).
async fn ids_in_seq_order(service: &EventService) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM edupulse.outbox ORDER BY seq")
        .fetch_all(service.pool())
        .await
        .unwrap()
}

async fn pending(service: &EventService) -> i64 {
    service.outbox_status().await.unwrap().pending
}

/// Asserts the stream holds exactly `expected`, once each, in that order.
async fn assert_stream_is(env: &TestEnv, js: &async_nats::jetstream::Context, expected: &[Uuid]) {
    let got = env.stream_ids(js).await;
    let unique: HashSet<&Uuid> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicates in the stream");
    assert_eq!(got.len(), expected.len(), "stream length");
    assert!(got == expected, "stream order differs from sequence order");
}

#[tokio::test]
async fn events_emitted_while_nats_is_down_are_delivered_in_order_once() {
    let mut nats = NatsServer::start().await;
    let env = TestEnv::with_nats(nats.url()).await;
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;

    let first = service.emit(quiz(0, 0)).await.unwrap();
    wait_for(WAIT, "the first event to be published", || async {
        pending(&service).await == 0
    })
    .await;

    nats.kill();
    for counter in 1..=100 {
        service
            .emit(quiz(0, counter))
            .await
            .expect("emit works without NATS");
    }
    // The relay keeps failing while NATS is down; the events wait in the outbox.
    wait_for(WAIT, "a failed publish attempt to be recorded", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM edupulse.outbox WHERE attempts > 0 AND status = 'pending'",
        )
        .fetch_one(service.pool())
        .await
        .unwrap()
            > 0
    })
    .await;
    assert_eq!(pending(&service).await, 100);
    // The handle says so, with the last error.
    wait_for(WAIT, "the relay to report that it is failing", || async {
        matches!(relay.status(), RelayStatus::Failing(_))
    })
    .await;
    assert!(relay.last_error().is_some());

    nats.restart().await;
    wait_for(
        WAIT,
        "every event to be published after NATS returns",
        || async { pending(&service).await == 0 },
    )
    .await;
    wait_for(WAIT, "the relay to report that it leads again", || async {
        relay.status() == RelayStatus::Leading
    })
    .await;
    assert_eq!(relay.last_error(), None);
    let expected = ids_in_seq_order(&service).await;
    assert_eq!(expected[0], first);
    let js = {
        drop(js);
        env.jetstream().await
    };
    assert_stream_is(&env, &js, &expected).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_relay_dying_between_ack_and_mark_leaves_one_copy_per_event() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;

    let doomed = service.start_relay().await.expect("the relay starts");
    doomed.crash_before_mark();
    let ids = service.emit_all((0..50).map(|c| quiz(1, c))).await.unwrap();
    wait_for(WAIT, "the doomed relay to publish and die", || async {
        doomed.is_finished()
    })
    .await;
    let doomed_sent = doomed.sent();
    doomed.shutdown().await.unwrap();
    // Published but not marked.
    assert_eq!(env.stream_len(&js).await, 50);
    assert_eq!(pending(&service).await, 50);

    let next = service.start_relay().await.expect("the relay starts");
    // Counted once the relay has seen its mark written, a moment after the database.
    wait_for(
        WAIT,
        "the next relay to republish, mark and count",
        || async { pending(&service).await == 0 && next.published() >= 50 },
    )
    .await;
    assert_eq!(next.published(), 50);
    // Both relays sent every event: the stream's duplicate removal kept one copy.
    assert_eq!(doomed_sent + next.sent(), 100);
    assert_stream_is(&env, &js, &ids).await;
    next.shutdown().await.unwrap();
}

#[tokio::test]
async fn three_relays_and_eight_writers_publish_each_event_once_in_sequence_order() {
    let env = TestEnv::new().await;
    let services = [
        env.service().await,
        env.service().await,
        env.service().await,
    ];
    let mut relays = Vec::new();
    for service in &services {
        relays.push(service.start_relay().await.expect("the relay starts"));
    }
    let js = env.jetstream().await;

    let writers: Vec<_> = (0..8u32)
        .map(|writer| {
            let service = services[writer as usize % 3].clone();
            tokio::spawn(async move {
                for counter in 0..1250u32 {
                    if counter % 50 == 0 {
                        // Some business transactions emit several events.
                        let mut tx = service.pool().begin().await.unwrap();
                        service
                            .emit_all_in(&mut tx, (0..5).map(|i| quiz(writer, counter * 10 + i)))
                            .await
                            .unwrap();
                        tx.commit().await.unwrap();
                    } else {
                        service.emit(quiz(writer, counter * 10)).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let expected = ids_in_seq_order(&services[0]).await;
    assert_eq!(expected.len(), 8 * (1250 + 25 * 4));
    // The relays count a mark once they have seen it written, a moment after the
    // database shows it.
    let published = || relays.iter().map(|r| r.published()).sum::<u64>();
    wait_for(WAIT, "every event to be published and counted", || async {
        pending(&services[0]).await == 0 && published() >= expected.len() as u64
    })
    .await;
    let leaders = relays.iter().filter(|r| r.is_leader()).count();
    assert_eq!(leaders, 1, "exactly one relay leads");
    assert_eq!(published(), expected.len() as u64);
    // Nothing was sent twice and left to JetStream's duplicate removal.
    let sent: u64 = relays.iter().map(|r| r.sent()).sum();
    assert_eq!(sent, expected.len() as u64, "messages sent to JetStream");
    assert_stream_is(&env, &js, &expected).await;
    for relay in relays {
        relay.shutdown().await.unwrap();
    }
}

/// The backend pid holding the relay's leader lock.
async fn leader_pid(service: &EventService) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(service.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn killing_the_leaders_connection_hands_over_without_loss() {
    let env = TestEnv::new().await;
    let a = env.service().await;
    let b = env.service().await;
    let relay_a = a.start_relay().await.expect("the relay starts");
    let relay_b = b.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    wait_for(WAIT, "a leader", || async {
        relay_a.is_leader() || relay_b.is_leader()
    })
    .await;

    let writer = {
        let a = a.clone();
        tokio::spawn(async move {
            for counter in 0..400 {
                a.emit(quiz(2, counter)).await.unwrap();
            }
        })
    };
    // Kill the leader's connection while events flow.
    wait_for(WAIT, "some events to be published", || async {
        relay_a.published() + relay_b.published() >= 50
    })
    .await;
    let pid = leader_pid(&a).await.expect("the leader holds the lock");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert!(killed);
    writer.await.unwrap();

    wait_for(WAIT, "a new leader to publish everything", || async {
        pending(&a).await == 0
    })
    .await;
    let new_pid = leader_pid(&a).await.expect("a leader again");
    assert_ne!(new_pid, pid);
    let expected = ids_in_seq_order(&a).await;
    assert_eq!(expected.len(), 400);
    assert_stream_is(&env, &js, &expected).await;
    relay_a.shutdown().await.unwrap();
    relay_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn killing_the_listen_connection_still_delivers_within_the_poll_interval() {
    let env = TestEnv::new().await;
    let service = env
        .service_with(env.config().relay(RelaySettings {
            poll_interval: Duration::from_secs(2),
            ..TestEnv::fast_relay()
        }))
        .await;
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    let first = service.emit(quiz(3, 0)).await.unwrap();
    wait_for(WAIT, "the first event", || async {
        pending(&service).await == 0
    })
    .await;

    let listeners: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(service.pool())
    .await
    .unwrap();
    assert_eq!(listeners.len(), 1, "the relay listens on one connection");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(listeners[0])
        .execute(service.pool())
        .await
        .unwrap();

    let started = tokio::time::Instant::now();
    let second = service.emit(quiz(3, 1)).await.unwrap();
    wait_for(WAIT, "the event after the kill", || async {
        pending(&service).await == 0
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2) + Duration::from_secs(3),
        "delivered within the poll interval (plus slack): {:?}",
        started.elapsed()
    );
    assert_stream_is(&env, &js, &[first, second]).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_notifications_the_poll_interval_delivers() {
    // Proves the polling path on its own: the LISTEN test above can also pass through
    // the listener's own reconnect.
    let env = TestEnv::new().await;
    let poll = Duration::from_millis(1500);
    let service = env
        .service_with(env.config().notify(false).relay(RelaySettings {
            poll_interval: poll,
            ..TestEnv::fast_relay()
        }))
        .await;
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    wait_for(WAIT, "the relay to lead", || async { relay.is_leader() }).await;
    let mut ids = Vec::new();
    for counter in 0..3 {
        let started = tokio::time::Instant::now();
        ids.push(service.emit(quiz(4, counter)).await.unwrap());
        wait_for(WAIT, "the event, with no notification", || async {
            pending(&service).await == 0
        })
        .await;
        assert!(
            started.elapsed() < poll + Duration::from_secs(2),
            "delivered within the poll interval (plus slack): {:?}",
            started.elapsed()
        );
    }
    assert_stream_is(&env, &js, &ids).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_relay_shut_down_while_failing_returns_the_failure() {
    let mut nats = NatsServer::start().await;
    let env = TestEnv::with_nats(nats.url()).await;
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "the relay to lead", || async { relay.is_leader() }).await;
    nats.kill();
    service
        .emit(quiz(0, 0))
        .await
        .expect("emit works without NATS");
    wait_for(WAIT, "the relay to report that it is failing", || async {
        matches!(relay.status(), RelayStatus::Failing(_))
    })
    .await;
    let error = relay
        .shutdown()
        .await
        .expect_err("a failing relay's shutdown says so");
    assert!(matches!(error, RelayError::Failing(_)), "{error:?}");
    assert!(error.to_string().contains("failing"), "{error}");
}

#[tokio::test]
async fn every_call_before_the_migrations_says_not_migrated_then_works_once_they_are_applied() {
    let env = TestEnv::new().await;
    let service = EventService::connect(env.config().build().unwrap())
        .await
        .unwrap();
    let refused = service
        .start_relay()
        .await
        .expect_err("no relay without an outbox");
    assert!(matches!(refused, RelayError::NotMigrated), "{refused:?}");
    assert!(refused.to_string().contains("migrate()"), "{refused}");
    let not_migrated = |result: Result<(), OutboxError>, call: &str| match result {
        Err(OutboxError::NotMigrated) => {}
        other => panic!("{call} before migrate() gave {other:?}"),
    };
    not_migrated(service.outbox_status().await.map(drop), "outbox_status");
    not_migrated(service.dead_events(10).await.map(drop), "dead_events");
    not_migrated(
        service.requeue_dead(Requeue::All).await.map(drop),
        "requeue_dead",
    );
    not_migrated(
        service.event_state(Uuid::now_v7()).await.map(drop),
        "event_state",
    );
    let consumer = service
        .consumer("early")
        .on(|_: edupulse_events::Received<QuizSubmitted>| async { Ok(()) })
        .start()
        .await
        .expect_err("no consumer without an inbox");
    assert_eq!(
        consumer.kind(),
        ConsumerErrorKind::NotMigrated,
        "{consumer}"
    );

    service.migrate().await.unwrap();
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    let id = service.emit(quiz(5, 0)).await.unwrap();
    wait_for(WAIT, "the event, once the outbox exists", || async {
        pending(&service).await == 0
    })
    .await;
    assert_stream_is(&env, &js, &[id]).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_relay_is_woken_by_each_commit_long_before_its_poll() {
    let env = TestEnv::new().await;
    let service = env
        .service_with(env.config().relay(RelaySettings {
            poll_interval: Duration::from_secs(60),
            ..TestEnv::fast_relay()
        }))
        .await;
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    let idle = || async {
        sqlx::query_scalar::<_, bool>("SELECT last_value = 1 FROM edupulse.relay_idle")
            .fetch_one(service.pool())
            .await
            .unwrap()
    };
    let mut ids = Vec::new();
    for counter in 0..9 {
        // Between bursts the relay says it is idle, so the next commit notifies.
        wait_for(WAIT, "the relay to say it is idle", || async {
            relay.is_leader() && idle().await
        })
        .await;
        let started = tokio::time::Instant::now();
        match counter % 3 {
            // The emitter's own transactions: woken after the commit, from outside.
            0 => ids.push(service.emit(quiz(6, counter)).await.unwrap()),
            1 => {
                let batch = [quiz(6, counter), quiz(7, counter)];
                ids.extend(service.emit_all(batch).await.unwrap());
            }
            // The caller's transaction: woken by the waker once it ends.
            _ => {
                let mut tx = service.pool().begin().await.unwrap();
                ids.push(service.emit_in(&mut tx, quiz(6, counter)).await.unwrap());
                tx.commit().await.unwrap();
            }
        }
        wait_for(WAIT, "the event", || async { pending(&service).await == 0 }).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "woken by the notification, not the 60 s poll: {:?}",
            started.elapsed()
        );
    }
    assert_stream_is(&env, &js, &ids).await;
    relay.shutdown().await.unwrap();
}

/// A service whose relay would poll only every ten minutes: anything published sooner
/// was woken. Returns it with its relay, once the relay has said it is idle.
async fn idle_relay_polling_rarely(
    env: &TestEnv,
    order_wait_limit: Duration,
) -> (EventService, edupulse_events::RelayHandle) {
    let service = env
        .service_with(env.config().relay(RelaySettings {
            poll_interval: Duration::from_secs(600),
            order_wait_limit,
            ..TestEnv::fast_relay()
        }))
        .await;
    // The flag starts at "idle" before any relay ran: make the idle below the relay's.
    sqlx::query("SELECT setval('edupulse.relay_idle', 0)")
        .execute(service.pool())
        .await
        .unwrap();
    let relay = service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "the relay to say it is idle", || async {
        relay.is_leader()
            && sqlx::query_scalar::<_, bool>("SELECT last_value = 1 FROM edupulse.relay_idle")
                .fetch_one(service.pool())
                .await
                .unwrap()
    })
    .await;
    (service, relay)
}

#[tokio::test]
async fn an_emit_in_held_open_does_not_hold_up_the_wake_up_of_a_commit_after_it() {
    let env = TestEnv::new().await;
    let (service, relay) = idle_relay_polling_rarely(&env, Duration::from_millis(200)).await;
    let js = env.jetstream().await;
    // All three writers find the relay idle. The first notifies in its transaction (one
    // writer at a time does); the other two leave their wake-up to the waker, which
    // waits for their transactions to end.
    let mut notifier = service.pool().begin().await.unwrap();
    let first = service.emit_in(&mut notifier, quiz(8, 0)).await.unwrap();
    let mut open = service.pool().begin().await.unwrap();
    let held = service.emit_in(&mut open, quiz(8, 1)).await.unwrap();
    let mut tx = service.pool().begin().await.unwrap();
    let committed = service.emit_in(&mut tx, quiz(8, 2)).await.unwrap();
    tx.commit().await.unwrap();
    // The relay is woken while the other two are still open, and publishes the
    // committed event past `order_wait_limit`; not after the ten-minute poll.
    wait_for(
        Duration::from_secs(30),
        "the committed event while the other transactions are open",
        || async { relay.published() == 1 },
    )
    .await;
    open.commit().await.unwrap();
    wait_for(
        Duration::from_secs(30),
        "the held event, once committed",
        || async { relay.published() == 2 },
    )
    .await;
    notifier.commit().await.unwrap();
    wait_for(
        Duration::from_secs(30),
        "the first event, once committed",
        || async { relay.published() == 3 },
    )
    .await;
    assert_stream_is(&env, &js, &[committed, held, first]).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rolled_back_emit_in_does_not_cost_another_writer_its_wake_up() {
    let env = TestEnv::new().await;
    let (service, relay) = idle_relay_polling_rarely(&env, Duration::from_secs(5)).await;
    let js = env.jetstream().await;
    let mut rolled_back = service.pool().begin().await.unwrap();
    service.emit_in(&mut rolled_back, quiz(9, 0)).await.unwrap();
    let mut tx = service.pool().begin().await.unwrap();
    let committed = service.emit_in(&mut tx, quiz(9, 1)).await.unwrap();
    rolled_back.rollback().await.unwrap();
    tx.commit().await.unwrap();
    wait_for(Duration::from_secs(30), "the committed event", || async {
        relay.published() == 1 && pending(&service).await == 0
    })
    .await;
    assert_stream_is(&env, &js, &[committed]).await;
    relay.shutdown().await.unwrap();
}

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.attached")]
pub struct LessonAttached {
    pub counter: u32,
    pub notes: String,
}

#[tokio::test]
async fn large_events_make_smaller_batches() {
    let env = TestEnv::new().await;
    let cap = 25_000;
    let service = env
        .service_with(env.config().relay(RelaySettings {
            batch_bytes: cap,
            ..TestEnv::fast_relay()
        }))
        .await;
    // About 10 KB each, not very compressible (random UUIDs).
    let notes = |_: u32| {
        (0..280)
            .map(|_| Uuid::new_v4().to_string())
            .collect::<String>()
    };
    let ids = service
        .emit_all((0..20).map(|counter| LessonAttached {
            counter,
            notes: notes(counter),
        }))
        .await
        .unwrap();
    // The batches the rule makes: each takes events while the bodies before stay
    // under the cap.
    let sizes: Vec<i64> = sqlx::query_scalar(
        "SELECT pg_column_size(payload)::int8 FROM edupulse.outbox ORDER BY seq",
    )
    .fetch_all(service.pool())
    .await
    .unwrap();
    assert!(
        sizes.iter().all(|s| *s > 5_000),
        "bodies stay large as stored: {sizes:?}"
    );
    let mut expected = 0;
    let mut before = i64::from(u32::MAX);
    for size in &sizes {
        if before >= i64::from(cap) {
            expected += 1;
            before = 0;
        }
        before += size;
    }

    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;
    wait_for(WAIT, "every event", || async { relay.published() == 20 }).await;
    assert_eq!(relay.batches(), expected, "batches for bodies of {sizes:?}");
    assert!(expected >= 7);
    assert_stream_is(&env, &js, &ids).await;
    relay.shutdown().await.unwrap();
}

async fn published_through(service: &EventService) -> i64 {
    sqlx::query_scalar("SELECT published_through FROM edupulse.relay_progress")
        .fetch_one(service.pool())
        .await
        .unwrap()
}

/// Events whose status was written one by one (not left to the mark).
async fn marked_one_by_one(service: &EventService) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM edupulse.outbox WHERE status = 'published'")
        .fetch_one(service.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_published_batch_moves_the_mark_instead_of_marking_each_event() {
    let env = TestEnv::new().await;
    let service = env
        .service_with(env.config().relay(TestEnv::fast_relay()))
        .await;
    let js = env.jetstream().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let ids = service
        .emit_all((0..100).map(|counter| quiz(0, counter)))
        .await
        .unwrap();
    wait_for(WAIT, "the relay to publish and mark 100 events", || async {
        relay.published() == 100
    })
    .await;
    assert_stream_is(&env, &js, &ids).await;
    assert_eq!(pending(&service).await, 0);
    let newest: i64 = sqlx::query_scalar("SELECT max(seq) FROM edupulse.outbox")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(published_through(&service).await, newest);
    assert_eq!(marked_one_by_one(&service).await, 0, "no row was rewritten");
    for id in &ids {
        assert_eq!(
            service.event_state(*id).await.unwrap(),
            Some(EventState::Published)
        );
    }
    assert_eq!(service.event_state(Uuid::now_v7()).await.unwrap(), None);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn past_order_wait_limit_the_mark_waits_for_the_held_transaction() {
    let env = TestEnv::new().await;
    let service = env
        .service_with(env.config().relay(RelaySettings {
            order_wait_limit: Duration::from_millis(300),
            ..TestEnv::fast_relay()
        }))
        .await;
    let js = env.jetstream().await;
    let relay = service.start_relay().await.expect("the relay starts");
    // An open transaction holds the first event.
    let mut open = service.pool().begin().await.unwrap();
    let held = service.emit_in(&mut open, quiz(0, 0)).await.unwrap();
    let held_seq: i64 = sqlx::query_scalar("SELECT seq FROM edupulse.outbox WHERE id = $1")
        .bind(held)
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let later = service
        .emit_all((1..=20).map(|counter| quiz(1, counter)))
        .await
        .unwrap();
    // Past the limit the later events go ahead, each marked by its status: moving the
    // mark past the held event would count it as published.
    wait_for(
        WAIT,
        "the later events to be published and marked",
        || async { relay.published() == 20 },
    )
    .await;
    assert_stream_is(&env, &js, &later).await;
    assert_eq!(marked_one_by_one(&service).await, 20);
    assert!(published_through(&service).await < held_seq);
    // The held event follows once its transaction commits; it is not lost.
    open.commit().await.unwrap();
    wait_for(WAIT, "the held event to be published", || async {
        service.event_state(held).await.unwrap() == Some(EventState::Published)
    })
    .await;
    assert_eq!(env.stream_ids(&js).await.last(), Some(&held));
    // With nothing held any more, the next batch moves the mark past everything.
    let last = service.emit(quiz(2, 0)).await.unwrap();
    wait_for(WAIT, "the mark to pass the newest event", || async {
        service.event_state(last).await.unwrap() == Some(EventState::Published)
    })
    .await;
    let newest: i64 = sqlx::query_scalar("SELECT max(seq) FROM edupulse.outbox")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(published_through(&service).await, newest);
    assert_eq!(marked_one_by_one(&service).await, 21);
    assert_eq!(pending(&service).await, 0);
    relay.shutdown().await.unwrap();
}
