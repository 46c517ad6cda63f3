//! The [`DomainEvent`] trait and what generated code calls to build a subject.

use crate::subject::{check_token, TokenProblem};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::TypeId;
use std::fmt::{self, Write as _};

/// A domain event: a named, versioned, routable fact that a service emits.
///
/// Implement it with `#[derive(DomainEvent)]`, which checks at compile time that:
/// - `name` is one or more dot-separated tokens of lowercase ASCII letters, digits, `_`
///   and `-`, at most 128 characters, with no wildcard and no leading `$`;
/// - `version` (default 1) is an integer of 1 or more;
/// - `subject` (default: the name) is made of such tokens and of `{field}` placeholders,
///   each a whole token naming a field of the struct whose type implements `Display`;
/// - `previous` (optional, on version 2 or later) names the type of the version before
///   this one: a `DomainEvent` with the same `name` and a `version` exactly one lower,
///   from which this type implements `From`. Each error is reported at the `previous`
///   value.
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
///
/// # Versions that evolve
///
/// When a payload changes, keep the old type and name it as the new one's `previous`,
/// with a `From` conversion (an upcast). Chains may be of any length (v1 → v2 → v3). A
/// consumer registered for the newest type then receives every older version in the
/// stream converted through the chain, one `From` at a time; its
/// [`Envelope::version`](crate::Envelope::version) still says which version was
/// published. A version with no path to the handled type (a newer one, or an older one
/// outside the chain) is dead-lettered as `unknown_version`. The older types stay
/// events of their own: emitting one is possible (and wise during a rolling deploy,
/// until every consumer runs the code that knows the newer version).
///
/// ```
/// use edupulse_events::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, DomainEvent)]
/// #[event(name = "quiz.submitted")]
/// pub struct QuizSubmittedV1 {
///     pub quiz_id: u64,
///     pub correct: u32,
/// }
///
/// #[derive(Debug, Serialize, Deserialize, DomainEvent)]
/// #[event(name = "quiz.submitted", version = 2, previous = QuizSubmittedV1)]
/// pub struct QuizSubmitted {
///     pub quiz_id: u64,
///     pub correct: u32,
///     pub total: Option<u32>,
/// }
///
/// impl From<QuizSubmittedV1> for QuizSubmitted {
///     fn from(v1: QuizSubmittedV1) -> Self {
///         QuizSubmitted { quiz_id: v1.quiz_id, correct: v1.correct, total: None }
///     }
/// }
///
/// let entry = edupulse_events::registry().get("quiz.submitted").unwrap();
/// assert!(entry.is::<QuizSubmitted>());
/// assert_eq!(entry.previous_type_name(), Some(std::any::type_name::<QuizSubmittedV1>()));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a domain event",
    label = "not a `DomainEvent`",
    note = "derive it: `#[derive(Serialize, Deserialize, DomainEvent)]` with `#[event(name = \"...\")]`"
)]
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

    /// The oldest version this type can be converted from through its `previous`
    /// chain (its own version when it has none). Generated code only.
    #[doc(hidden)]
    const __OLDEST_VERSION: u32 = Self::VERSION;

    /// The type named by `previous`, if any. Generated code only.
    #[doc(hidden)]
    const __PREVIOUS: Option<Previous> = None;

    /// Decodes a payload published as `version` of this event, converted into this
    /// type through the `previous` chain; `None` when `version` has no path to this
    /// type. Generated code only.
    #[doc(hidden)]
    fn __upcast(version: u32, payload: &[u8]) -> Option<Result<Self, serde_json::Error>> {
        (version == Self::VERSION).then(|| serde_json::from_slice(payload))
    }
}

/// The type an event names as its `previous` version (generated code only).
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Previous {
    /// The previous type's id.
    pub type_id: fn() -> TypeId,
    /// The previous type's Rust path.
    pub type_name: fn() -> &'static str,
}

impl Previous {
    /// The description of `P` (generated code only).
    pub const fn of<P: 'static>() -> Previous {
        Previous {
            type_id: TypeId::of::<P>,
            type_name: std::any::type_name::<P>,
        }
    }
}

/// Whether two strings are equal, in a constant (generated code only).
#[doc(hidden)]
pub const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `Self` converts from the previous version `P` (generated code only): the bound the
/// derive's upcast needs, with a message that says what to write.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`previous = {P}` needs `impl From<{P}> for {Self}`, the upcast from the previous version",
    label = "no `From<{P}>` for `{Self}`",
    note = "write `impl From<{P}> for {Self} {{ fn from(old: {P}) -> Self {{ ... }} }}`, filling the new fields from the old ones"
)]
pub trait UpcastFrom<P> {
    /// Converts the previous version.
    fn upcast_from(previous: P) -> Self;
}

impl<P, E: From<P>> UpcastFrom<P> for E {
    fn upcast_from(previous: P) -> Self {
        E::from(previous)
    }
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

    #[test]
    fn same_str_compares_whole_strings() {
        assert!(same_str("quiz.submitted", "quiz.submitted"));
        assert!(same_str("", ""));
        assert!(!same_str("quiz.submitted", "quiz.submitte"));
        assert!(!same_str("quiz.submitted", "quiz.submitteD"));
    }
}
