use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", subject = "quiz.{id}")]
pub struct QuizSubmitted(pub u64);

fn main() {}
