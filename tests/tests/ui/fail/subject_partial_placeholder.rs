use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz-{quiz_id}.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: u64,
}

fn main() {}
