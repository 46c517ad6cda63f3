use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[event(name = "quiz.graded", subject = "quiz.{quiz_id}.graded")]
pub struct QuizGraded {
    pub quiz_id: u64,
    #[serde(rename = "pct")]
    pub score_percent: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

fn main() {
    let event = QuizGraded { quiz_id: 3, score_percent: 90, comment: None };
    let json = serde_json::to_string(&event).unwrap();
    assert_eq!(json, r#"{"quizId":3,"pct":90}"#);
    let decoded = edupulse_events::registry()
        .get("quiz.graded")
        .unwrap()
        .decode(json.as_bytes())
        .unwrap()
        .downcast::<QuizGraded>()
        .unwrap();
    assert_eq!(decoded, event);
    assert_eq!(event.subject().unwrap(), "quiz.3.graded");
}
