//! Replaying a group's dead letters after the fix is deployed, against the real Postgres
//! and NATS: the recorded messages go back to that group's handler alone, in stream
//! order, exactly once through the inbox; a replay that fails again stays a dead letter.

use edupulse_events::{ConsumerSettings, DeadReason, DomainEvent, Replay};
use edupulse_events_tests::{wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn dead_letters_replayed_after_the_fix_reach_their_group_in_order_once() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    sqlx::query("CREATE TABLE grades (lesson_id BIGINT PRIMARY KEY)")
        .execute(service.pool())
        .await
        .unwrap();
    let relay = service.start_relay().await.expect("the relay starts");
    // The bug: lessons 2, 3 and 5 fail. The fix, deployed later, handles 2 and 3; 5
    // still fails.
    let fixed = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (flag, sink) = (fixed.clone(), handled.clone());
    let settings = ConsumerSettings {
        max_deliveries: 2,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        ack_wait: Duration::from_secs(2),
        ..ConsumerSettings::default()
    };
    let grading = service
        .consumer("grading")
        .settings(settings.clone())
        .on_tx::<LessonPublished, _>(move |tx, received| {
            let (flag, sink) = (flag.clone(), sink.clone());
            Box::pin(async move {
                let id = received.event.lesson_id;
                let broken = [2, 3].contains(&id) && !flag.load(Ordering::SeqCst);
                if broken || id == 5 {
                    return Err(format!("lesson {id} cannot be graded").into());
                }
                sqlx::query("INSERT INTO grades (lesson_id) VALUES ($1)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sink.lock().unwrap().push(id);
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    // Another group on the same events, which handled them all: a replay of grading's
    // letters must not reach it.
    let others = Arc::new(Mutex::new(Vec::new()));
    let other_sink = others.clone();
    let notifier = service
        .consumer("notifier")
        .settings(settings)
        .on::<LessonPublished, _, _>(move |received| {
            let sink = other_sink.clone();
            async move {
                sink.lock().unwrap().push(received.event.lesson_id);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    service
        .emit_all((1..=6).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .unwrap();
    wait_for(
        WAIT,
        "three dead letters and three lessons graded",
        || async {
            service.dead_letters("grading", 10).await.unwrap().len() == 3
                && handled.lock().unwrap().len() == 3
                && others.lock().unwrap().len() == 6
        },
    )
    .await;
    assert_eq!(*handled.lock().unwrap(), vec![1, 4, 6]);
    assert_eq!(
        service
            .replay_dead_letters("notifier", Replay::All)
            .await
            .unwrap(),
        0,
        "the notifier has nothing to replay"
    );

    // Deploy the fix, then replay every letter of the group.
    fixed.store(true, Ordering::SeqCst);
    let asked = service
        .replay_dead_letters("grading", Replay::Reason(DeadReason::HandlerFailed))
        .await
        .unwrap();
    assert_eq!(asked, 3);
    wait_for(WAIT, "the replays to be tried", || async {
        let dead = service.dead_letters("grading", 10).await.unwrap();
        dead.iter().all(|letter| letter.replays == 1)
    })
    .await;
    assert_eq!(
        *handled.lock().unwrap(),
        vec![1, 4, 6, 2, 3],
        "replayed in stream order"
    );
    let dead = service.dead_letters("grading", 10).await.unwrap();
    let by_lesson = |lesson: i64| {
        dead.iter()
            .find(|letter| {
                serde_json::from_slice::<serde_json::Value>(&letter.payload).unwrap()["lesson_id"]
                    == lesson
            })
            .unwrap()
    };
    assert!(by_lesson(2).replayed_at.is_some());
    assert!(by_lesson(3).replayed_at.is_some());
    let still = by_lesson(5);
    assert!(
        still.replayed_at.is_none(),
        "a replay that fails stays dead"
    );
    assert!(still.error.contains("lesson 5"), "{}", still.error);
    assert_eq!(
        others.lock().unwrap().len(),
        6,
        "the notifier got nothing again"
    );

    // Asked again: a replayed letter is left alone, the failed one goes once more;
    // through the inbox, nothing is applied twice.
    let asked = service
        .replay_dead_letters("grading", Replay::All)
        .await
        .unwrap();
    assert_eq!(asked, 1, "only the letter still dead");
    wait_for(WAIT, "the second replay of lesson 5", || async {
        let dead = service.dead_letters("grading", 10).await.unwrap();
        dead.iter().any(|letter| letter.replays == 2)
    })
    .await;
    // By id: a replayed letter is not asked for again; the dead one is.
    let (replayed, dead) = {
        let letters = service.dead_letters("grading", 10).await.unwrap();
        let id_of = |replayed: bool| {
            letters
                .iter()
                .find(|letter| letter.replayed_at.is_some() == replayed)
                .unwrap()
                .id
        };
        (id_of(true), id_of(false))
    };
    let asked = service
        .replay_dead_letters("grading", Replay::Ids(vec![replayed, dead]))
        .await
        .unwrap();
    assert_eq!(asked, 1, "only the dead one of the two ids");
    wait_for(WAIT, "the third replay of lesson 5", || async {
        let dead = service.dead_letters("grading", 10).await.unwrap();
        dead.iter().any(|letter| letter.replays == 3)
    })
    .await;
    let grades: i64 = sqlx::query_scalar("SELECT count(*) FROM grades")
        .fetch_one(service.pool())
        .await
        .unwrap();
    assert_eq!(grades, 5);
    grading.shutdown().await.unwrap();
    notifier.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}
