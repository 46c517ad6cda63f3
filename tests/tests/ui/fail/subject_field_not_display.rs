use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{quiz_id}")]
pub struct QuizSubmitted {
    pub quiz_id: Option<u64>,
}

fn main() {}
