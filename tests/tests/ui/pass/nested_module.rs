mod learning {
    pub mod events {
        use serde::{Deserialize, Serialize};

        #[derive(Debug, Serialize, Deserialize, edupulse_events::DomainEvent)]
        #[event(name = "lesson.published")]
        pub struct LessonPublished {
            pub lesson_id: u64,
        }
    }
}

fn main() {
    use edupulse_events::DomainEvent as _;
    let entry = edupulse_events::registry()
        .get("lesson.published")
        .expect("registered");
    assert!(
        entry.type_name().ends_with("::learning::events::LessonPublished"),
        "{}",
        entry.type_name()
    );
    assert!(entry.is::<learning::events::LessonPublished>());
    assert_eq!(learning::events::LessonPublished::NAME, "lesson.published");
}
