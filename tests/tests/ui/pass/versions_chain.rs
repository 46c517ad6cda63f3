//! A chain of versions, v1 → v2 → v3, across modules, with a path in `previous`.

mod old {
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted")]
    pub struct QuizSubmitted {
        pub quiz_id: u64,
    }
}

#[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
#[event(name = "quiz.submitted", version = 2, previous = old::QuizSubmitted)]
pub struct QuizSubmittedV2 {
    pub quiz_id: u64,
    pub score: Option<u32>,
}

impl From<old::QuizSubmitted> for QuizSubmittedV2 {
    fn from(old: old::QuizSubmitted) -> Self {
        QuizSubmittedV2 {
            quiz_id: old.quiz_id,
            score: None,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 3,
    previous = crate::QuizSubmittedV2,
    subject = "quiz.{quiz_id}.submitted"
)]
pub struct QuizSubmitted {
    pub quiz_id: u64,
    pub score: u32,
}

impl From<QuizSubmittedV2> for QuizSubmitted {
    fn from(v2: QuizSubmittedV2) -> Self {
        QuizSubmitted {
            quiz_id: v2.quiz_id,
            score: v2.score.unwrap_or(0),
        }
    }
}

fn main() {
    use edupulse_events::DomainEvent as _;
    assert_eq!(QuizSubmitted::VERSION, 3);
    let registry = edupulse_events::registry();
    assert!(registry.validate().is_ok());
    assert!(registry.get("quiz.submitted").expect("registered").is::<QuizSubmitted>());
    assert_eq!(
        registry.get_type::<QuizSubmitted>().and_then(|t| t.previous_type_name()),
        Some(std::any::type_name::<QuizSubmittedV2>())
    );
}
