use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct QuizSubmittedV1 {
    pub quiz_id: u64,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", version = 2, previous = QuizSubmittedV1)]
pub struct QuizSubmitted {
    pub quiz_id: u64,
}

impl From<QuizSubmittedV1> for QuizSubmitted {
    fn from(old: QuizSubmittedV1) -> Self {
        QuizSubmitted { quiz_id: old.quiz_id }
    }
}

fn main() {}
