// Every mistake of one item is reported in one build, not only the first.
use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "Lesson Published", version = 0, subject = "lesson.{missing}", colour = "red")]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {}
