use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.changed")]
pub enum LessonChanged {
    Published { lesson_id: u64 },
    Archived { lesson_id: u64 },
}

fn main() {}
