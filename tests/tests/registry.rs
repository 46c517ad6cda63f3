//! The event registry: lookup by name, name order, decoding by name.

use edupulse_events::{registry, DomainEvent, TokenProblem};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: u64,
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
    pub score: f32,
}

mod nested {
    #[derive(Debug, serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "account.created")]
    pub struct AccountCreated {
        pub user: String,
    }
}

#[test]
fn registered_types_are_found_by_name_in_name_order() {
    let names: Vec<&str> = registry().iter().map(|t| t.name()).collect();
    assert_eq!(
        names,
        ["account.created", "lesson.published", "quiz.submitted"]
    );
    assert_eq!(registry().len(), 3);
    assert!(registry().validate().is_ok());

    let quiz = registry()
        .get("quiz.submitted")
        .expect("quiz.submitted registered");
    assert_eq!(quiz.version(), 2);
    assert_eq!(quiz.subject_template(), "quiz.{quiz_id}.submitted");
    assert_eq!(quiz.type_name(), "registry::QuizSubmitted");
    assert!(quiz.is::<QuizSubmitted>());
    assert!(!quiz.is::<LessonPublished>());
    assert_eq!(
        registry().get("account.created").unwrap().type_name(),
        "registry::nested::AccountCreated"
    );
    assert!(registry().get("quiz").is_none());
    assert!(registry().get_type::<LessonPublished>().is_some());
}

#[test]
fn a_payload_decodes_by_name() {
    let entry = registry().get("lesson.published").unwrap();
    let decoded = entry
        .decode(br#"{"lesson_id": 9, "title": "Ownership"}"#)
        .expect("valid payload");
    assert_eq!(decoded.event_type().name(), "lesson.published");
    assert!(decoded.downcast_ref::<QuizSubmitted>().is_none());
    let decoded = decoded.downcast::<QuizSubmitted>().expect_err("wrong type");
    let event = decoded.downcast::<LessonPublished>().expect("right type");
    assert_eq!(
        event,
        LessonPublished {
            lesson_id: 9,
            title: "Ownership".into()
        }
    );

    let error = entry.decode(br#"{"lesson_id": "nine"}"#).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("`lesson.published`"), "{message}");
    assert!(message.contains("registry::LessonPublished"), "{message}");
    assert!(entry.decode(b"not json").is_err());
}

#[test]
fn subjects_are_filled_and_hostile_values_are_refused() {
    let ok = QuizSubmitted {
        quiz_id: "3f2c".into(),
        score: 1.0,
    };
    assert_eq!(ok.subject().unwrap(), "quiz.3f2c.submitted");
    assert_eq!(
        LessonPublished {
            lesson_id: 1,
            title: "a.b c".into()
        }
        .subject()
        .unwrap(),
        "lesson.published"
    );

    let hostile = [
        ("", TokenProblem::Empty),
        ("a.b", TokenProblem::Dot),
        ("*", TokenProblem::Wildcard),
        (">", TokenProblem::Wildcard),
        ("x y", TokenProblem::Whitespace),
        ("x\r\nPUB evil 0", TokenProblem::Whitespace),
        ("x\u{0}", TokenProblem::Control),
    ];
    for (value, problem) in hostile {
        let event = QuizSubmitted {
            quiz_id: value.into(),
            score: 0.0,
        };
        let error = event.subject().expect_err(value);
        assert_eq!(error.reason, problem, "{value:?}");
        assert_eq!(error.field, "quiz_id");
        assert_eq!(error.event, "quiz.submitted");
    }
}
