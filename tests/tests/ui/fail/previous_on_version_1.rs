use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted")]
pub struct QuizSubmittedV1 {
    pub quiz_id: u64,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", previous = QuizSubmittedV1)]
pub struct QuizSubmitted {
    pub quiz_id: u64,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded", version = 1, previous = QuizSubmittedV1)]
pub struct QuizGraded {
    pub quiz_id: u64,
}

fn main() {}
