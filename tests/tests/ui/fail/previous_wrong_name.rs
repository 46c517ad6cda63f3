use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded")]
pub struct QuizGraded {
    pub quiz_id: u64,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", version = 2, previous = QuizGraded)]
pub struct QuizSubmitted {
    pub quiz_id: u64,
}

impl From<QuizGraded> for QuizSubmitted {
    fn from(old: QuizGraded) -> Self {
        QuizSubmitted { quiz_id: old.quiz_id }
    }
}

fn main() {}
