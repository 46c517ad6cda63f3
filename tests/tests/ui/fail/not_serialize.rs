use edupulse_events::DomainEvent;

#[derive(DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: u64,
}

fn main() {}
