use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

mod v1 {
    #[derive(serde::Serialize, serde::Deserialize, edupulse_events::DomainEvent)]
    #[event(name = "quiz.submitted")]
    pub struct QuizSubmitted {
        pub quiz_id: u64,
    }
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", version = 2, previous = v1::QuizSubmitted)]
pub struct QuizSubmitted {
    pub quiz_id: u64,
    pub score: Option<u32>,
}

fn main() {}
