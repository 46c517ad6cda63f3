//! Versions of one event name in the registry: keyed by name and version, the chain
//! linked by `previous`, and a version whose predecessor is missing from the chain
//! reported by `validate()`. This binary registers broken chains on purpose (as
//! `registry_duplicates` registers a duplicate): the whole program's registry is
//! invalid.

use edupulse_events::{registry, DomainEvent, EventType};
use serde::{Deserialize, Serialize};

/// A complete chain, v1 → v2 → v3: valid.
mod quiz {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted")]
    pub struct V1 {
        pub quiz_id: u64,
    }

    #[derive(Serialize, Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted", version = 2, previous = V1)]
    pub struct V2 {
        pub quiz_id: u64,
        pub score: Option<u32>,
    }

    impl From<V1> for V2 {
        fn from(old: V1) -> Self {
            V2 {
                quiz_id: old.quiz_id,
                score: None,
            }
        }
    }

    #[derive(Serialize, Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted", version = 3, previous = V2)]
    pub struct V3 {
        pub quiz_id: u64,
        pub score: u32,
    }

    impl From<V2> for V3 {
        fn from(old: V2) -> Self {
            V3 {
                quiz_id: old.quiz_id,
                score: old.score.unwrap_or(0),
            }
        }
    }
}

/// Version 2 alone, without `previous`: valid (this program knows no older version).
#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "course.closed", version = 2)]
pub struct CourseClosed {
    pub course_id: u64,
}

/// Versions 1 and 2 registered, but version 2 names no `previous`: reported.
mod lesson {
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "lesson.published")]
    pub struct LessonPublishedV1 {
        pub lesson_id: u64,
    }

    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "lesson.published", version = 2)]
    pub struct LessonPublished {
        pub lesson_id: u64,
        pub title: String,
    }
}

/// Versions 1 and 3 registered, version 2 missing: reported.
mod grade {
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "grade.given")]
    pub struct GradeGivenV1 {
        pub grade: u32,
    }

    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "grade.given", version = 3)]
    pub struct GradeGiven {
        pub grade: u32,
    }
}

/// Version 2 names a hand-written (so unregistered) version 1 as `previous`: reported.
mod account {
    use edupulse_events::{DomainEvent, SubjectError};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct AccountCreatedV1 {
        pub user: String,
    }

    impl DomainEvent for AccountCreatedV1 {
        const NAME: &'static str = "account.created";
        const VERSION: u32 = 1;
        const SUBJECT_TEMPLATE: &'static str = "account.created";

        fn subject(&self) -> Result<String, SubjectError> {
            Ok(Self::SUBJECT_TEMPLATE.to_owned())
        }
    }

    #[derive(Serialize, Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "account.created", version = 2, previous = AccountCreatedV1)]
    pub struct AccountCreated {
        pub user: String,
    }

    impl From<AccountCreatedV1> for AccountCreated {
        fn from(old: AccountCreatedV1) -> Self {
            AccountCreated { user: old.user }
        }
    }
}

fn entry<E: DomainEvent>() -> &'static EventType {
    registry().get_type::<E>().expect("registered")
}

#[test]
fn types_are_keyed_by_name_and_version() {
    let newest = registry().get("quiz.submitted").expect("registered");
    assert!(newest.is::<quiz::V3>(), "{newest:?}");
    assert_eq!(newest.version(), 3);
    for (version, is) in [
        (1, entry::<quiz::V1>()),
        (2, entry::<quiz::V2>()),
        (3, entry::<quiz::V3>()),
    ] {
        let found = registry()
            .get_version("quiz.submitted", version)
            .expect("each version registered");
        assert!(std::ptr::eq(found, is), "version {version}: {found:?}");
    }
    assert!(registry().get_version("quiz.submitted", 4).is_none());
    assert_eq!(entry::<quiz::V1>().previous_type_name(), None);
    assert_eq!(
        entry::<quiz::V2>().previous_type_name(),
        Some(std::any::type_name::<quiz::V1>())
    );
    assert_eq!(
        entry::<quiz::V3>().previous_type_name(),
        Some(std::any::type_name::<quiz::V2>())
    );
    // Every version is its own entry, in version order.
    let quiz_versions: Vec<u32> = registry()
        .iter()
        .filter(|t| t.name() == "quiz.submitted")
        .map(|t| t.version())
        .collect();
    assert_eq!(quiz_versions, [1, 2, 3]);
}

#[test]
fn a_version_whose_predecessor_is_missing_is_reported() {
    let error = registry().validate().expect_err("three chains are broken");
    assert!(error.duplicates.is_empty(), "{error}");
    let reported: Vec<(&str, u32, &str, Option<&str>)> = error
        .missing_predecessors
        .iter()
        .map(|m| (m.name, m.version, m.type_name, m.previous))
        .collect();
    assert_eq!(
        reported,
        [
            (
                "account.created",
                2,
                "registry_versions::account::AccountCreated",
                Some(std::any::type_name::<account::AccountCreatedV1>()),
            ),
            (
                "grade.given",
                3,
                "registry_versions::grade::GradeGiven",
                None
            ),
            (
                "lesson.published",
                2,
                "registry_versions::lesson::LessonPublished",
                None
            ),
        ]
    );
    // Version 2 of grade.given is missing: no type to suggest.
    assert!(error.missing_predecessors[1].registered_before.is_empty());
    assert_eq!(
        error.missing_predecessors[2].registered_before,
        ["registry_versions::lesson::LessonPublishedV1"]
    );

    let message = error.to_string();
    assert!(
        message.contains(
            "event `lesson.published` version 2 (`registry_versions::lesson::LessonPublished`) \
             has no `previous`"
        ),
        "{message}"
    );
    assert!(
        message.contains("add `previous = LessonPublishedV1`"),
        "{message}"
    );
    assert!(
        message.contains("version 2 is not registered") && message.contains("define version 2"),
        "{message}"
    );
    assert!(
        message.contains("that type is not registered: derive `DomainEvent` for it"),
        "{message}"
    );
    // The complete chain and the lone version 2 are not reported.
    assert!(!message.contains("quiz.submitted"), "{message}");
    assert!(!message.contains("course.closed"), "{message}");
    assert_eq!(CourseClosed::VERSION, 2);
}
