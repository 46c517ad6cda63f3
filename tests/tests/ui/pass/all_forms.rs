use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: u64,
    pub title: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted", version = 2, subject = "quiz.{quiz_id}.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: u64,
    pub score: f32,
}

// Keys may be split over several attributes, in any order.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(subject = "{course}.{type}")]
#[event(version = 3)]
#[event(name = "course_v2.enrolment-changed")]
pub struct EnrolmentChanged {
    pub course: String,
    pub r#type: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "system.tick")]
pub struct Tick;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "system.ping", crate = "::edupulse_events")]
pub struct Ping(pub u32);

fn main() {
    assert_eq!(LessonPublished::NAME, "lesson.published");
    assert_eq!(LessonPublished::VERSION, 1);
    assert_eq!(QuizSubmitted::VERSION, 2);
    assert_eq!(QuizSubmitted::SUBJECT_TEMPLATE, "quiz.{quiz_id}.submitted");
    let quiz = QuizSubmitted { quiz_id: 7, score: 1.0 };
    assert_eq!(quiz.subject().unwrap(), "quiz.7.submitted");
    let changed = EnrolmentChanged { course: "rust101".into(), r#type: "join".into() };
    assert_eq!(changed.subject().unwrap(), "rust101.join");
    assert_eq!(EnrolmentChanged::VERSION, 3);
    assert_eq!(Tick.subject().unwrap(), "system.tick");
    assert_eq!(Ping(1).subject().unwrap(), "system.ping");
}
