use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event = "lesson.published"]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {}
