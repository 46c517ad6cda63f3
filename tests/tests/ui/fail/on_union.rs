use edupulse_events::DomainEvent;

#[derive(DomainEvent)]
#[event(name = "lesson.raw")]
pub union Raw {
    pub a: u32,
    pub b: f32,
}

fn main() {}
