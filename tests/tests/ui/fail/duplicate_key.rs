use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
#[event(name = "lesson.created")]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {}
