// A failed derive still emits a stub impl: code that uses the type as an event
// reports only the real mistake, not a cascade of "trait not implemented" errors.
use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson..published")]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn takes_event<E: DomainEvent>(_event: &E) -> &'static str {
    E::NAME
}

fn main() {
    let event = LessonPublished { lesson_id: 1 };
    let _ = takes_event(&event);
    let _ = LessonPublished::VERSION;
}
