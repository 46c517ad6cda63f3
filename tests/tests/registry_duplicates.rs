//! Two types registered under one event name and version are reported, naming both
//! types; another version of the same name, linked by `previous`, is not a duplicate.

use edupulse_events::{registry, DomainEvent};
use serde::{Deserialize, Serialize};

mod grading {
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted")]
    pub struct QuizSubmitted {
        pub quiz_id: u64,
    }
}

mod analytics {
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted")]
    pub struct QuizTaken {
        pub quiz: u64,
    }

    /// Version 2 of the shared name, in the chain: not a duplicate.
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted", version = 2, previous = QuizTaken)]
    pub struct QuizTakenV2 {
        pub quiz: u64,
    }

    impl From<QuizTaken> for QuizTakenV2 {
        fn from(old: QuizTaken) -> Self {
            QuizTakenV2 { quiz: old.quiz }
        }
    }
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: u64,
}

#[test]
fn a_shared_name_is_an_error_naming_both_types() {
    let error = registry()
        .validate()
        .expect_err("two types share quiz.submitted");
    assert_eq!(error.duplicates.len(), 1);
    assert!(error.missing_predecessors.is_empty(), "{error}");
    let duplicate = &error.duplicates[0];
    assert_eq!(duplicate.name, "quiz.submitted");
    assert_eq!(duplicate.version, 1);
    assert_eq!(
        duplicate.type_names,
        [
            "registry_duplicates::analytics::QuizTaken",
            "registry_duplicates::grading::QuizSubmitted"
        ]
    );
    let message = error.to_string();
    assert!(message.contains("`quiz.submitted` version 1"), "{message}");
    assert!(!message.contains("QuizTakenV2"), "{message}");
    assert!(
        message.contains("`registry_duplicates::grading::QuizSubmitted`"),
        "{message}"
    );
    assert!(
        message.contains("`registry_duplicates::analytics::QuizTaken`"),
        "{message}"
    );
    assert!(!message.contains("lesson.published"), "{message}");

    // Both stay reachable by type, and iteration lists both.
    assert!(registry().get_type::<grading::QuizSubmitted>().is_some());
    assert!(registry().get_type::<analytics::QuizTaken>().is_some());
    assert!(registry().get_type::<analytics::QuizTakenV2>().is_some());
    assert_eq!(registry().len(), 4);
    assert_eq!(LessonPublished::NAME, "lesson.published");
}

#[tokio::test]
async fn the_service_refuses_to_start_with_a_shared_name() {
    // The registry is checked before any connection: these addresses are never tried.
    let config = edupulse_events::Config::builder("postgres://postgres@127.0.0.1:1/none")
        .nats_url("nats://127.0.0.1:1")
        .build()
        .unwrap();
    let error = edupulse_events::EventService::connect(config)
        .await
        .expect_err("two types share quiz.submitted");
    assert_eq!(error.kind(), edupulse_events::ConnectErrorKind::Registry);
    assert!(error.to_string().contains("`quiz.submitted`"), "{error}");
}
