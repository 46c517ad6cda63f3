use edupulse_events::schemars::{self, JsonSchema};
use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(name = "lesson.published", schema, schema)]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {}
