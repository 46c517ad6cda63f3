use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published", version = 2147483648)]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {}
