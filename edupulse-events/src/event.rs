//! The [`DomainEvent`] trait and what generated code calls to build a subject.

use crate::subject::{check_token, TokenProblem};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::{self, Write as _};

/// A domain event: a named, versioned, routable fact that a service emits.
///
/// Implement it with `#[derive(DomainEvent)]`, which checks at compile time that:
/// - `name` is one or more dot-separated tokens of lowercase ASCII letters, digits, `_`
///   and `-`, at most 128 characters, with no wildcard and no leading `$`;
/// - `version` (default 1) is an integer of 1 or more;
/// - `subject` (default: the name) is made of such tokens and of `{field}` placeholders,
///   each a whole token naming a field of the struct whose type implements `Display`.
///
/// ```
/// use edupulse_events::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[event(name = "quiz.submitted", version = 2, subject = "quiz.{quiz_id}.submitted")]
/// pub struct QuizSubmitted {
///     pub quiz_id: u64,
///     pub score: f32,
/// }
///
/// assert_eq!(QuizSubmitted::NAME, "quiz.submitted");
/// assert_eq!(QuizSubmitted::VERSION, 2);
/// let event = QuizSubmitted { quiz_id: 42, score: 0.9 };
/// assert_eq!(event.subject().unwrap(), "quiz.42.submitted");
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable, unique event name, e.g. `"lesson.published"`.
    const NAME: &'static str;
    /// The schema version of the payload, 1 unless given.
    const VERSION: u32;
    /// The subject template as written, e.g. `"quiz.{quiz_id}.submitted"` (the name when
    /// no subject was given).
    const SUBJECT_TEMPLATE: &'static str;

    /// The event's subject relative to the service's prefix, with each placeholder filled
    /// from the field's `Display`.
    ///
    /// # Errors
    /// [`SubjectError`] when a field's value is not a valid single subject token: empty,
    /// or containing `.`, `*`, `>`, whitespace or a control character.
    fn subject(&self) -> Result<String, SubjectError>;
}

/// A field's value cannot stand as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event `{event}`: field `{field}` = {value:?} cannot be used in the subject: {reason}; \
     give the field a value without `.`, `*`, `>`, whitespace or control characters, or \
     leave it out of the event's `subject`"
)]
pub struct SubjectError {
    /// The event's name.
    pub event: &'static str,
    /// The field whose value was rejected.
    pub field: &'static str,
    /// The value, shortened to at most [`SubjectError::MAX_SHOWN`] characters.
    pub value: String,
    /// What is wrong with it.
    pub reason: TokenProblem,
}

impl SubjectError {
    /// How many characters of a rejected value the error keeps.
    pub const MAX_SHOWN: usize = 64;
}

/// Appends a literal token (generated code only).
pub fn push_literal(out: &mut String, token: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(token);
}

/// Appends a field's value as a token, checking it (generated code only).
///
/// # Errors
/// [`SubjectError`] when the value is not a valid token.
pub fn push_field<V: fmt::Display + ?Sized>(
    out: &mut String,
    event: &'static str,
    field: &'static str,
    value: &V,
) -> Result<(), SubjectError> {
    if !out.is_empty() {
        out.push('.');
    }
    let start = out.len();
    // Writing into a String cannot fail; a Display impl that reports an error anyway
    // leaves what it wrote, which the check below then judges.
    let _ = write!(out, "{value}");
    let token = &out[start..];
    check_token(token).map_err(|reason| SubjectError {
        event,
        field,
        value: token.chars().take(SubjectError::MAX_SHOWN).collect(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_field_reports_field_and_shortened_value() {
        let mut out = String::from("quiz");
        let long = format!("{}.", "y".repeat(100));
        let error = push_field(&mut out, "quiz.submitted", "quiz_id", &long).unwrap_err();
        assert_eq!(error.field, "quiz_id");
        assert_eq!(error.event, "quiz.submitted");
        assert_eq!(error.reason, TokenProblem::Dot);
        assert_eq!(error.value.chars().count(), SubjectError::MAX_SHOWN);
        let message = error.to_string();
        assert!(message.contains("`quiz_id`"), "{message}");
        assert!(message.contains("separates subject tokens"), "{message}");

        let mut out = String::new();
        push_field(&mut out, "e", "f", &7u8).unwrap();
        push_literal(&mut out, "done");
        assert_eq!(out, "7.done");
    }
}
