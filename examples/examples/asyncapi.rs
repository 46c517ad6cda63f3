//! The contract other teams read: this service's events as an AsyncAPI 3.0 document,
//! with a JSON Schema for each payload, written to a file (no services needed).
//!
//! ```sh
//! cargo run -p edupulse-events-examples --example asyncapi -- asyncapi.json
//! ```
//!
//! The path defaults to `asyncapi.json`. `EDUPULSE_SUBJECT_PREFIX`, `EDUPULSE_STREAM` and
//! `EDUPULSE_SOURCE` set the addresses and the title, as for the service itself.

use edupulse_events::schemars::{self, JsonSchema};
use edupulse_events::{contract, Config, DomainEvent, Uuid};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;

/// A teacher published a lesson.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(
    name = "lesson.published",
    subject = "lesson.{course_id}.published",
    schema
)]
pub struct LessonPublished {
    /// The course the lesson belongs to.
    pub course_id: Uuid,
    /// The lesson.
    pub lesson_id: Uuid,
    /// Its title, as shown to students.
    pub title: String,
    /// A summary, where the teacher wrote one.
    pub summary: Option<String>,
}

/// A student submitted a quiz; routed per quiz.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(
    name = "quiz.submitted",
    version = 2,
    subject = "quiz.{quiz_id}.submitted",
    schema
)]
pub struct QuizSubmitted {
    /// The quiz.
    pub quiz_id: Uuid,
    /// The student.
    pub student_id: Uuid,
    /// The answers, in question order.
    pub answers: Vec<String>,
}

fn main() -> ExitCode {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "asyncapi.json".to_owned());
    // The document needs the subject prefix, stream and source, not the database.
    let lookup = |key: &'static str| match key {
        "DATABASE_URL" => Ok("postgres://unused".to_owned()),
        _ => std::env::var(key),
    };
    let config = match Config::from_lookup(lookup) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let document = contract::asyncapi(&config, env!("CARGO_PKG_VERSION"));
    let text = match edupulse_events::serde_json::to_string_pretty(&document) {
        Ok(text) => text + "\n",
        Err(error) => {
            eprintln!("error: cannot write the document as JSON: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = std::fs::write(&path, text) {
        eprintln!("error: cannot write {path}: {error}; give a writable path as the argument");
        return ExitCode::FAILURE;
    }
    let events = document["operations"].as_object().map_or(0, |o| o.len());
    println!("wrote the AsyncAPI 3.0 document of {events} event types to {path}");
    ExitCode::SUCCESS
}
