//! The outbox and the relay against the real Postgres and NATS: emitting, the message
//! format, rollbacks, bad input, dead events, status and pruning.

use edupulse_events::{
    Config, ConfigError, ConnectErrorKind, DomainEvent, EmitErrorKind, EventService, EventState,
    Outgoing, RelaySettings, Requeue,
};
use edupulse_events_tests::{header, wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 2,
    subject = "quiz.{quiz_id}.submitted"
)]
pub struct QuizSubmitted {
    pub quiz_id: String,
    pub student_id: Uuid,
    pub score: f32,
}

fn lesson(n: i64) -> LessonPublished {
    LessonPublished {
        lesson_id: n,
        title: format!("Lesson {n}"),
    }
}

const WAIT: Duration = Duration::from_secs(20);

async fn wait_stream_len(env: &TestEnv, js: &async_nats::jetstream::Context, n: u64) {
    wait_for(WAIT, &format!("{n} messages in the stream"), || async {
        env.stream_len(js).await >= n
    })
    .await;
}

#[tokio::test]
async fn an_emitted_event_is_published_with_cloudevents_headers() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    let relay = service.start_relay().await.expect("the relay starts");

    let student = Uuid::now_v7();
    let correlation = Uuid::now_v7();
    let cause = Uuid::now_v7();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let id = service
        .emit(
            Outgoing::new(QuizSubmitted {
                quiz_id: "q42".into(),
                student_id: student,
                score: 0.5,
            })
            .correlation_id(correlation)
            .causation_id(cause)
            .traceparent(traceparent),
        )
        .await
        .expect("emit");
    assert_eq!(id.get_version_num(), 7, "event ids are UUID v7");

    wait_stream_len(&env, &js, 1).await;
    let messages = env.stream_messages(&js).await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        message.subject.as_str(),
        format!("{}.quiz.q42.submitted", env.prefix)
    );
    assert_eq!(header(message, "ce-specversion"), "1.0");
    assert_eq!(header(message, "ce-id"), id.to_string());
    assert_eq!(header(message, "Nats-Msg-Id"), id.to_string());
    assert_eq!(header(message, "ce-type"), "quiz.submitted");
    assert_eq!(header(message, "ce-source"), "edupulse-tests");
    assert_eq!(header(message, "ce-eventversion"), "2");
    assert_eq!(header(message, "Content-Type"), "application/json");
    assert_eq!(header(message, "ce-correlationid"), correlation.to_string());
    assert_eq!(header(message, "ce-causationid"), cause.to_string());
    assert_eq!(header(message, "traceparent"), traceparent);
    let time = header(message, "ce-time");
    assert!(
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).is_ok(),
        "{time}"
    );
    let body: QuizSubmitted = serde_json::from_slice(&message.payload).expect("JSON body");
    assert_eq!(body.student_id, student);
    assert_eq!(body.quiz_id, "q42");

    // The event is marked published.
    wait_for(WAIT, "the event to be marked published", || async {
        service.event_state(id).await.unwrap() == Some(EventState::Published)
    })
    .await;
    assert_eq!(service.outbox_status().await.unwrap().pending, 0);
    relay.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_rolled_back_event_is_never_published() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    let relay = service.start_relay().await.expect("the relay starts");

    let mut tx = service.pool().begin().await.unwrap();
    let rolled_back = service.emit_in(&mut tx, lesson(1)).await.unwrap();
    tx.rollback().await.unwrap();

    let mut tx = service.pool().begin().await.unwrap();
    let dropped = service.emit_in(&mut tx, lesson(2)).await.unwrap();
    drop(tx);

    // A later committed event is the marker: once it is published, the relay has been
    // past the rolled-back ones.
    let committed = service.emit(lesson(3)).await.unwrap();
    wait_stream_len(&env, &js, 1).await;
    let ids = env.stream_ids(&js).await;
    assert_eq!(ids, vec![committed]);
    assert!(!ids.contains(&rolled_back) && !ids.contains(&dropped));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM edupulse.outbox WHERE id = ANY($1)")
        .bind(vec![rolled_back, dropped])
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    relay.shutdown().await.unwrap();
    assert_eq!(env.stream_len(&js).await, 1);
}

#[tokio::test]
async fn the_business_row_and_its_event_commit_together() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    sqlx::query("CREATE TABLE lessons (id BIGINT PRIMARY KEY, title TEXT NOT NULL)")
        .execute(service.pool())
        .await
        .unwrap();

    let mut tx = service.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO lessons VALUES (7, 'Ownership')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id = service.emit_in(&mut tx, lesson(7)).await.unwrap();
    // Not visible outside the transaction before commit.
    let outside: i64 = sqlx::query_scalar("SELECT count(*) FROM edupulse.outbox")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(outside, 0);
    tx.commit().await.unwrap();

    let row = sqlx::query("SELECT name, version, subject, payload, source, status, correlation_id FROM edupulse.outbox WHERE id = $1")
        .bind(id)
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("name"), "lesson.published");
    assert_eq!(row.get::<i32, _>("version"), 1);
    assert_eq!(row.get::<String, _>("subject"), "lesson.published");
    assert_eq!(row.get::<String, _>("status"), "pending");
    assert_eq!(row.get::<String, _>("source"), "edupulse-tests");
    assert_eq!(row.get::<Option<Uuid>, _>("correlation_id"), Some(id));
    let payload: serde_json::Value = row.get("payload");
    assert_eq!(
        payload,
        serde_json::json!({"lesson_id": 7, "title": "Lesson 7"})
    );
}

#[tokio::test]
async fn emit_all_writes_a_batch_in_order_and_notifies() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let mut listener = sqlx::postgres::PgListener::connect(&env.database_url)
        .await
        .unwrap();
    listener.listen("edupulse_outbox").await.unwrap();

    let ids = service
        .emit_all((0..500).map(lesson))
        .await
        .expect("batch emit");
    assert_eq!(ids.len(), 500);
    let notification = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("a notification at commit")
        .unwrap();
    assert_eq!(notification.channel(), "edupulse_outbox");

    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM edupulse.outbox ORDER BY seq")
        .fetch_all(service.pool())
        .await
        .unwrap();
    assert_eq!(stored, ids);
    let empty = service
        .emit_all(Vec::<LessonPublished>::new())
        .await
        .unwrap();
    assert!(empty.is_empty());

    // Single emits notify too.
    service.emit(lesson(1)).await.unwrap();
    tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("a notification for a single emit")
        .unwrap();

    // While the relay says it is busy, emitting does not notify (notifications arrive
    // in commit order, so the marker sent after the emits must come first).
    sqlx::query("SELECT setval('edupulse.relay_idle', 0)")
        .execute(service.pool())
        .await
        .unwrap();
    service.emit(lesson(2)).await.unwrap();
    service.emit_all((3..10).map(lesson)).await.unwrap();
    sqlx::query("SELECT pg_notify('edupulse_outbox', 'marker')")
        .execute(service.pool())
        .await
        .unwrap();
    let next = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("the marker")
        .unwrap();
    assert_eq!(next.payload(), "marker", "a busy relay is not notified");

    // A REPEATABLE READ writer whose snapshot predates the relay going idle still sees
    // that it is idle at its insert, and notifies.
    let mut tx = service.pool().begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM edupulse.outbox")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT setval('edupulse.relay_idle', 1)")
        .execute(service.pool())
        .await
        .unwrap();
    service.emit_in(&mut tx, lesson(10)).await.unwrap();
    tx.commit().await.unwrap();
    let next = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("a notification from the repeatable-read writer")
        .unwrap();
    assert_eq!(next.payload(), "", "the emit's notification");
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM edupulse.outbox")
            .fetch_one(service.pool())
            .await
            .unwrap()
    };

    // Hostile subject values.
    for hostile in ["", "a.b", "*", ">", "x y", "x\r\nPUB evil 1", "x\u{0}"] {
        let error = service
            .emit(QuizSubmitted {
                quiz_id: hostile.into(),
                student_id: Uuid::now_v7(),
                score: 0.0,
            })
            .await
            .expect_err(hostile);
        assert_eq!(error.kind(), EmitErrorKind::Subject, "{hostile:?}");
        assert!(error.to_string().contains("quiz_id"), "{error}");
    }

    // Oversized: just above the limit, counting headers.
    let max = service.max_message_size();
    let big = LessonPublished {
        lesson_id: 1,
        title: "x".repeat(max),
    };
    let error = service.emit(big.clone()).await.expect_err("too large");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge);
    assert!(error.to_string().contains(&max.to_string()), "{error}");
    let error = service
        .emit_all(vec![lesson(1), big.clone(), lesson(2)])
        .await
        .expect_err("a batch with one oversized event");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge);

    // Within a caller's transaction the refusal leaves the transaction usable.
    let mut tx = service.pool().begin().await.unwrap();
    assert!(service.emit_in(&mut tx, big).await.is_err());
    service
        .emit_in(&mut tx, lesson(3))
        .await
        .expect("tx still usable");
    tx.rollback().await.unwrap();

    let error = service
        .emit(Outgoing::new(lesson(1)).traceparent("not-a-trace\r\nX: y"))
        .await
        .expect_err("bad traceparent");
    assert_eq!(error.kind(), EmitErrorKind::Traceparent);

    assert_eq!(count().await, 0, "nothing was written");
}

#[tokio::test]
async fn the_largest_event_emit_accepts_is_published() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    let with_title = |n: usize| LessonPublished {
        lesson_id: 1,
        title: "z".repeat(n),
    };
    // Find the longest title emit accepts (in transactions rolled back).
    let (mut low, mut high) = (0, service.max_message_size());
    while low + 1 < high {
        let mid = (low + high) / 2;
        let mut tx = service.pool().begin().await.unwrap();
        match service.emit_in(&mut tx, with_title(mid)).await {
            Ok(_) => low = mid,
            Err(e) => {
                assert_eq!(e.kind(), EmitErrorKind::TooLarge, "{e}");
                high = mid;
            }
        }
        tx.rollback().await.unwrap();
    }
    assert!(low > service.max_message_size() / 2);
    // An event before it: the relay then sends the largest one with the chain header
    // naming its predecessor, which emit must have counted.
    let first = service.emit(with_title(1)).await.unwrap();
    // The time header's length varies by a byte or two between emits.
    let mut id = None;
    for n in (low.saturating_sub(4)..=low).rev() {
        if let Ok(emitted) = service.emit(with_title(n)).await {
            id = Some(emitted);
            break;
        }
    }
    let id = id.expect("an event at the limit is accepted");
    let relay = service.start_relay().await.expect("the relay starts");
    wait_stream_len(&env, &js, 2).await;
    assert_eq!(env.stream_ids(&js).await, vec![first, id]);
    assert_eq!(service.outbox_status().await.unwrap().dead, 0);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn connect_errors_are_clear() {
    let env = TestEnv::new().await;

    // Missing DATABASE_URL is a value, not a panic.
    let missing = Config::from_lookup(|_| Err(std::env::VarError::NotPresent)).unwrap_err();
    assert_eq!(missing, ConfigError::MissingDatabaseUrl);

    // Postgres unreachable.
    let port = edupulse_events_tests::free_port();
    let config = env
        .config()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let unreachable = Config::builder(format!("postgres://postgres:pw-secret@127.0.0.1:{port}/x"))
        .nats_url(&env.nats_url)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let error = EventService::connect(unreachable).await.unwrap_err();
    assert_eq!(error.kind(), ConnectErrorKind::Postgres);
    let message = error.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("pw-secret"), "{message}");

    // NATS unreachable.
    let port = edupulse_events_tests::free_port();
    let error = EventService::connect(
        env.config()
            .nats_url(format!("nats://user:nats-secret@127.0.0.1:{port}"))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), ConnectErrorKind::Nats);
    let message = error.to_string();
    assert!(message.contains("nats-server"), "{message}");
    assert!(!message.contains("nats-secret"), "{message}");

    // A conflicting existing stream: same name, other subjects.
    let js = env.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}-other.>", env.prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let error = EventService::connect(config.clone()).await.unwrap_err();
    assert_eq!(error.kind(), ConnectErrorKind::StreamConflict);
    assert!(error.to_string().contains(&env.stream), "{error}");

    // Same subjects, other duplicate window.
    js.delete_stream(&env.stream).await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.prefix)],
        duplicate_window: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let error = EventService::connect(config.clone()).await.unwrap_err();
    assert_eq!(error.kind(), ConnectErrorKind::StreamConflict);
    assert!(error.to_string().contains("duplicate window"), "{error}");

    // Another stream already captures the prefix.
    js.delete_stream(&env.stream).await.unwrap();
    let squatter = format!("{}_SQUAT", env.stream);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: squatter.clone(),
        subjects: vec![format!("{}.>", env.prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let error = EventService::connect(config.clone()).await.unwrap_err();
    js.delete_stream(&squatter).await.unwrap();
    assert_eq!(error.kind(), ConnectErrorKind::StreamConflict, "{error}");

    // With the conflict gone, connecting works and creates the stream; connecting again
    // accepts the stream it made.
    EventService::connect(config.clone())
        .await
        .expect("connect");
    let service = EventService::connect(config).await.expect("connect again");

    // Emitting before migrating says what to do.
    let error = service.emit(lesson(1)).await.unwrap_err();
    assert_eq!(error.kind(), EmitErrorKind::NotMigrated);
    assert!(error.to_string().contains("migrate()"), "{error}");
}

#[tokio::test]
async fn migrating_is_idempotent_concurrent_and_apart_from_the_apps_migrations() {
    let env = TestEnv::new().await;
    let config = env.config().build().unwrap();
    let a = EventService::connect(config.clone()).await.unwrap();
    let b = EventService::connect(config).await.unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.expect("first migrator");
    rb.expect("second migrator");
    a.migrate().await.expect("again");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .fetch_all(a.pool())
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "edupulse._migrations",
            "edupulse.dead_letters",
            "edupulse.inbox",
            "edupulse.outbox",
            "edupulse.pending_events",
            "edupulse.relay_progress"
        ]
    );
}

#[tokio::test]
async fn a_rejected_event_goes_dead_without_blocking_the_rest_and_can_be_requeued() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let js = env.jetstream().await;
    // The stream refuses messages over 1,000 bytes (headers count): a reason retrying cannot fix.
    let mut stream_config = js
        .get_stream(&env.stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    stream_config.max_message_size = 1000;
    js.update_stream(&stream_config).await.unwrap();

    let before = service.emit(lesson(1)).await.unwrap();
    let poison = service
        .emit(LessonPublished {
            lesson_id: 2,
            title: "y".repeat(1200),
        })
        .await
        .unwrap();
    let after = service.emit(lesson(3)).await.unwrap();

    let relay = service.start_relay().await.expect("the relay starts");
    wait_stream_len(&env, &js, 2).await;
    wait_for(WAIT, "the poison event to be dead", || async {
        service.outbox_status().await.unwrap().dead == 1
    })
    .await;
    assert_eq!(env.stream_ids(&js).await, vec![before, after]);
    let dead = service.dead_events(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("maximum"),
        "{:?}",
        dead[0].last_error
    );

    // Once the stream accepts it, requeueing sends it.
    stream_config.max_message_size = -1;
    js.update_stream(&stream_config).await.unwrap();
    assert_eq!(
        service
            .requeue_dead(Requeue::Ids(vec![Uuid::now_v7()]))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        service
            .requeue_dead(Requeue::Ids(vec![poison]))
            .await
            .unwrap(),
        1
    );
    wait_stream_len(&env, &js, 3).await;
    assert_eq!(env.stream_ids(&js).await, vec![before, after, poison]);
    // Marked after the ack: wait for it.
    wait_for(WAIT, "nothing pending or dead", || async {
        let status = service.outbox_status().await.unwrap();
        (status.pending, status.dead) == (0, 0)
    })
    .await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_shows_pending_and_age() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let status = service.outbox_status().await.unwrap();
    assert_eq!((status.pending, status.dead), (0, 0));
    assert_eq!(status.oldest_pending_age, Duration::ZERO);
    assert_eq!(status.oldest_pending_seq, None);

    service.emit_all((0..3).map(lesson)).await.unwrap();
    sqlx::query("UPDATE edupulse.outbox SET occurred_at = now() - interval '90 seconds'")
        .execute(service.pool())
        .await
        .unwrap();
    let status = service.outbox_status().await.unwrap();
    assert_eq!(status.pending, 3);
    assert!(
        status.oldest_pending_age >= Duration::from_secs(90),
        "{status:?}"
    );
    assert!(status.oldest_pending_seq.is_some());
}

#[tokio::test]
async fn published_rows_are_pruned_after_retention() {
    let env = TestEnv::new().await;
    // Retention zero: deleted on publish.
    let service = env
        .service_with(env.config().relay(RelaySettings {
            retention: Duration::ZERO,
            ..TestEnv::fast_relay()
        }))
        .await;
    let js = env.jetstream().await;
    let relay = service.start_relay().await.expect("the relay starts");
    service.emit_all((0..50).map(lesson)).await.unwrap();
    wait_stream_len(&env, &js, 50).await;
    wait_for(WAIT, "published rows to be deleted", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM edupulse.outbox")
            .fetch_one(service.pool())
            .await
            .unwrap()
            == 0
    })
    .await;
    relay.shutdown().await.unwrap();

    // A short retention: kept, then pruned in batches.
    let service = env
        .service_with(env.config().relay(RelaySettings {
            retention: Duration::from_millis(300),
            prune_interval: Duration::from_millis(100),
            prune_batch: 7,
            ..TestEnv::fast_relay()
        }))
        .await;
    let relay = service.start_relay().await.expect("the relay starts");
    service.emit_all((0..40).map(lesson)).await.unwrap();
    wait_stream_len(&env, &js, 90).await;
    wait_for(WAIT, "published rows to be pruned", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM edupulse.outbox")
            .fetch_one(service.pool())
            .await
            .unwrap()
            == 0
    })
    .await;
    assert_eq!(env.stream_len(&js).await, 90);
    relay.shutdown().await.unwrap();
}

/// An event whose compact JSON fits but whose JSONB, as Postgres prints it (a space
/// after each `,`), does not: only the insert's own size check can refuse it.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.tagged")]
pub struct LessonTagged {
    pub lesson_id: i64,
    pub tags: Vec<u8>,
}

#[tokio::test]
async fn a_batch_over_several_statements_is_written_all_or_nothing() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let max = service.max_message_size();
    let small = |lesson_id| LessonTagged {
        lesson_id,
        tags: Vec::new(),
    };
    let sneaky = LessonTagged {
        lesson_id: -1,
        tags: vec![1; max * 2 / 5],
    };
    assert!(serde_json::to_string(&sneaky).unwrap().len() < max - 1_000);
    // 6,000 events take two statements; the refused one is in the second.
    let mut batch: Vec<LessonTagged> = (0..6_000).map(small).collect();
    batch.push(sneaky);

    // In the caller's transaction: refused with the size Postgres would store, nothing
    // written, and the transaction still usable.
    let mut tx = service.pool().begin().await.unwrap();
    let error = service
        .emit_all_in(&mut tx, batch.clone())
        .await
        .expect_err("one event too large as JSONB");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge, "{error}");
    let printed = 3 * (max * 2 / 5);
    assert!(
        error.to_string().contains(" is ") && reported_size(&error.to_string()) > printed,
        "the printed JSONB size (over {printed} bytes) is reported: {error}"
    );
    assert_eq!(
        outbox_rows(&mut tx).await,
        0,
        "the first statement was undone"
    );
    service.emit_in(&mut tx, small(1)).await.expect("usable");
    tx.commit().await.unwrap();

    // On a connection outside a transaction, and with emit_all: nothing written.
    let mut conn = env.connect().await;
    let error = service
        .emit_all_in(&mut conn, batch.clone())
        .await
        .expect_err("too large");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge);
    let error = service.emit_all(batch).await.expect_err("too large");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge);
    assert_eq!(outbox_rows(&mut conn).await, 1);

    // Without it, both ways write everything.
    let ids = service
        .emit_all_in(&mut conn, (0..6_000).map(small))
        .await
        .unwrap();
    assert_eq!(ids.len(), 6_000);
    let mut tx = service.pool().begin().await.unwrap();
    service
        .emit_all_in(&mut tx, (0..6_000).map(small))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox_rows(&mut conn).await, 12_001);
}

async fn outbox_rows(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM edupulse.outbox")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// The `{size}` of a TooLarge message: "event `x` is {size} bytes encoded …".
fn reported_size(message: &str) -> usize {
    message
        .split(" is ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Tiny as compact JSON, huge as Postgres prints JSONB: 1e300 is written in full.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded")]
pub struct QuizGraded {
    pub scores: Vec<f64>,
}

#[tokio::test]
async fn numbers_that_print_larger_as_jsonb_are_measured_as_printed() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let max = service.max_message_size();
    // Each 1e300 takes 5 bytes compact and 301 printed.
    let huge = QuizGraded {
        scores: vec![1e300; max / 301 + 10],
    };
    assert!(serde_json::to_string(&huge).unwrap().len() < max / 10);
    let error = service
        .emit(huge.clone())
        .await
        .expect_err("too large as printed");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge, "{error}");
    let error = service
        .emit_all(vec![QuizGraded { scores: vec![1.0] }, huge])
        .await
        .expect_err("too large as printed, in a batch");
    assert_eq!(error.kind(), EmitErrorKind::TooLarge, "{error}");
    let mut conn = env.connect().await;
    assert_eq!(outbox_rows(&mut conn).await, 0);
    // A small one with exponents is checked, and fits.
    service
        .emit(QuizGraded {
            scores: vec![1e3, 2.5e-3],
        })
        .await
        .expect("fits");
    assert_eq!(outbox_rows(&mut conn).await, 1);
}

#[tokio::test]
async fn purge_dead_letters_deletes_only_the_groups_older_records() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let insert = "INSERT INTO edupulse.dead_letters
        (consumer_group, reason, error, subject, stream_sequence, deliveries, headers,
         payload, created_at)
        VALUES ($1, 'handler_failed', 'boom', 'x.y', $2, 1, '{}', '\\x00',
                now() - make_interval(days => $3))";
    for (group, sequence, days) in [
        ("grading", 1_i64, 40),
        ("grading", 2, 1),
        ("billing", 3, 40),
    ] {
        sqlx::query(insert)
            .bind(group)
            .bind(sequence)
            .bind(days)
            .execute(service.pool())
            .await
            .unwrap();
    }
    let emitter =
        edupulse_events::Emitter::from_pool(service.pool().clone(), service.config().clone());
    let purged = emitter
        .purge_dead_letters("grading", Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    let left: Vec<i64> = sqlx::query_scalar(
        "SELECT stream_sequence FROM edupulse.dead_letters ORDER BY stream_sequence",
    )
    .fetch_all(service.pool())
    .await
    .unwrap();
    assert_eq!(left, [2, 3], "grading's recent one and billing's stay");
}
