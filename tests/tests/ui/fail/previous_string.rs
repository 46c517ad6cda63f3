use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", version = 2, previous = "QuizSubmittedV1")]
pub struct QuizSubmitted {
    pub quiz_id: u64,
}

fn main() {}
