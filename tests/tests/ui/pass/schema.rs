use edupulse_events::schemars::{self, JsonSchema};
use edupulse_events::{contract, DomainEvent};
use serde::{Deserialize, Serialize};

/// One line opts in: `schema` in the attribute, `JsonSchema` in the derive.
#[derive(Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(name = "lesson.published", schema)]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {
    let schema = contract::schema_of::<LessonPublished>().expect("registered");
    assert_eq!(schema.id(), "urn:edupulse:lesson.published:v1");
}
