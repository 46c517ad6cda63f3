//! Versions that evolve, against the real Postgres and NATS: v1, v2 and v3 of one event
//! are emitted (the older types too) and published by the relay; a consumer of v3
//! receives each converted through the `previous` chain, its envelope saying which
//! version was published, and a version with no path to v3 is dead-lettered as
//! `unknown_version`.

use edupulse_events::{DeadReason, DomainEvent, Received};
use edupulse_events_tests::{wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{quiz_id}.submitted")]
pub struct QuizSubmittedV1 {
    pub quiz_id: String,
    pub correct: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 2,
    previous = QuizSubmittedV1,
    subject = "quiz.{quiz_id}.submitted"
)]
pub struct QuizSubmittedV2 {
    pub quiz_id: String,
    pub correct: u32,
    pub total: Option<u32>,
    /// Set by the conversion from v1 (never in a published v2 payload).
    #[serde(default, skip_serializing)]
    pub from_v1: bool,
}

impl From<QuizSubmittedV1> for QuizSubmittedV2 {
    fn from(v1: QuizSubmittedV1) -> Self {
        QuizSubmittedV2 {
            quiz_id: v1.quiz_id,
            correct: v1.correct,
            total: None,
            from_v1: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 3,
    previous = QuizSubmittedV2,
    subject = "quiz.{quiz_id}.submitted"
)]
pub struct QuizSubmitted {
    pub quiz_id: String,
    /// The score in percent; `None` where the total was not known (before v2).
    pub percent: Option<u32>,
    /// Which conversions the event went through, to tell an upcast from a v3 payload.
    #[serde(default)]
    pub upcast_from: Vec<u32>,
}

impl From<QuizSubmittedV2> for QuizSubmitted {
    fn from(v2: QuizSubmittedV2) -> Self {
        let mut upcast_from = Vec::new();
        if v2.from_v1 {
            upcast_from.push(1);
        }
        upcast_from.push(2);
        QuizSubmitted {
            percent: v2
                .total
                .filter(|total| *total > 0)
                .map(|total| v2.correct * 100 / total),
            quiz_id: v2.quiz_id,
            upcast_from,
        }
    }
}

/// Version 2 of another event, without `previous`: version 1 has no path to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "course.closed", version = 2)]
pub struct CourseClosed {
    pub course_id: String,
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_consumer_of_the_newest_version_receives_every_older_one_converted() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");

    // Older versions are still emitted (a producer not yet upgraded), and published.
    let v1 = service
        .emit(QuizSubmittedV1 {
            quiz_id: "was-v1".into(),
            correct: 7,
        })
        .await
        .unwrap();
    let v2 = service
        .emit(QuizSubmittedV2 {
            quiz_id: "was-v2".into(),
            correct: 3,
            total: Some(4),
            from_v1: false,
        })
        .await
        .unwrap();
    let v3 = service
        .emit(QuizSubmitted {
            quiz_id: "was-v3".into(),
            percent: Some(50),
            upcast_from: Vec::new(),
        })
        .await
        .unwrap();

    // Messages with no path to the handled types: a newer version than the consumer
    // knows, and an older version outside any chain.
    let js = env.jetstream().await;
    let publish = |subject: String, name: &str, version: &str, body: &'static [u8]| {
        let js = js.clone();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("ce-specversion", "1.0");
        headers.insert("ce-id", Uuid::now_v7().to_string().as_str());
        headers.insert("ce-type", name);
        headers.insert("ce-eventversion", version);
        async move {
            js.publish_with_headers(subject, headers, body.into())
                .await
                .expect("published")
                .await
                .expect("acknowledged");
        }
    };
    publish(
        format!("{}.quiz.was-v4.submitted", env.prefix),
        "quiz.submitted",
        "4",
        br#"{"quiz_id": "was-v4", "percent": 10, "upcast_from": []}"#,
    )
    .await;
    publish(
        format!("{}.course.closed", env.prefix),
        "course.closed",
        "1",
        br#"{"course_id": "c1"}"#,
    )
    .await;
    // Version 2 of `course.closed` is handled, behind them.
    service
        .emit(CourseClosed {
            course_id: "c2".into(),
        })
        .await
        .unwrap();

    let received: Arc<Mutex<Vec<Received<QuizSubmitted>>>> = Arc::default();
    let closed: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (seen, seen_closed) = (received.clone(), closed.clone());
    let consumer = service
        .consumer("grading")
        .on(move |event: Received<QuizSubmitted>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(event);
                Ok(())
            }
        })
        .on(move |event: Received<CourseClosed>| {
            let seen = seen_closed.clone();
            async move {
                seen.lock().unwrap().push(event.envelope.version);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    wait_for(WAIT, "four handled events", || async {
        consumer.handled() == 4
    })
    .await;
    wait_for(WAIT, "two dead letters", || async {
        consumer.dead_lettered() == 2
    })
    .await;

    let mut received = received.lock().unwrap().clone();
    received.sort_by_key(|r| r.envelope.version);
    let got: Vec<(Uuid, u32, &str, QuizSubmitted)> = received
        .iter()
        .map(|r| {
            (
                r.envelope.id,
                r.envelope.version,
                r.envelope.name.as_str(),
                r.event.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                v1,
                1,
                "quiz.submitted",
                QuizSubmitted {
                    quiz_id: "was-v1".into(),
                    percent: None,
                    upcast_from: vec![1, 2],
                }
            ),
            (
                v2,
                2,
                "quiz.submitted",
                QuizSubmitted {
                    quiz_id: "was-v2".into(),
                    percent: Some(75),
                    upcast_from: vec![2],
                }
            ),
            (
                v3,
                3,
                "quiz.submitted",
                QuizSubmitted {
                    quiz_id: "was-v3".into(),
                    percent: Some(50),
                    upcast_from: Vec::new(),
                }
            ),
        ]
    );
    assert_eq!(*closed.lock().unwrap(), [2]);

    let mut dead = service.dead_letters("grading", 10).await.unwrap();
    dead.sort_by_key(|d| d.stream_sequence);
    let reasons: Vec<DeadReason> = dead.iter().map(|d| d.reason).collect();
    assert_eq!(
        reasons,
        [DeadReason::UnknownVersion, DeadReason::UnknownVersion]
    );
    assert_eq!(DeadReason::UnknownVersion.as_str(), "unknown_version");
    assert!(
        dead[0].error.contains("`quiz.submitted` has version 4")
            && dead[0].error.contains("versions 1 to 3"),
        "{}",
        dead[0].error
    );
    assert!(
        dead[1].error.contains("`course.closed` has version 1")
            && dead[1].error.contains("handles version 2"),
        "{}",
        dead[1].error
    );
    assert_eq!(dead[1].payload, br#"{"course_id": "c1"}"#);

    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}
