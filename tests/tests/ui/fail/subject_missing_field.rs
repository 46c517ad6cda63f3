use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{quizid}.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: u64,
    pub score: f32,
}

fn main() {}
