//! Routes: which handler an event name goes to, how its payload is decoded, and which
//! subjects the group reads.

use super::envelope::{Envelope, HandlerError};
use super::ConsumerError;
use crate::DomainEvent;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

/// What the handler of one event type is, in three parts: how its payload, published
/// as a given version, is decoded and converted through the `previous` chain (boxed,
/// for the type-erased call below; `None` when the version has no path to the
/// handler's type), and the call itself, plain or in a transaction.
pub(super) type Decode = fn(u32, &[u8]) -> Option<Result<Box<dyn Any + Send>, serde_json::Error>>;
/// An `on` handler, behind the type erasure: takes what [`decode_any`] made.
pub(super) type PlainCall = Arc<
    dyn Fn(Box<dyn Any + Send>, Envelope) -> BoxFuture<'static, Result<(), HandlerError>>
        + Send
        + Sync,
>;
/// An `on_tx` handler, behind the type erasure: takes the transaction and what
/// [`decode_any`] made.
pub(super) type TxCall = Arc<
    dyn for<'c> Fn(
            &'c mut PgConnection,
            Box<dyn Any + Send>,
            Envelope,
        ) -> BoxFuture<'c, Result<(), HandlerError>>
        + Send
        + Sync,
>;

/// How a handler is called: on its own, or inside a transaction with the inbox.
#[derive(Clone)]
pub(super) enum Call {
    /// Registered with `on`.
    Plain(PlainCall),
    /// Registered with `on_tx`.
    Tx(TxCall),
}

/// One event type a group handles.
#[derive(Clone)]
pub(super) struct Route {
    /// The event name.
    pub name: &'static str,
    /// The schema version the handler takes.
    pub version: u32,
    /// The oldest version converted into it through the `previous` chain (`version`
    /// when the type has no `previous`).
    pub oldest_version: u32,
    /// The subject filter, relative to the prefix, e.g. `quiz.*.submitted`.
    pub filter: String,
    /// Decodes the payload into the event type.
    pub decode: Decode,
    /// The handler.
    pub call: Call,
}

impl Route {
    /// The route of events of type `E` to `call`.
    pub fn of<E: DomainEvent>(call: Call) -> Route {
        Route {
            name: E::NAME,
            version: E::VERSION,
            oldest_version: E::__OLDEST_VERSION,
            filter: filter_of(E::SUBJECT_TEMPLATE),
            decode: decode_any::<E>,
            call,
        }
    }
}

impl Route {
    /// Whether a message published as `version` has a path to the handler's type.
    pub fn accepts(&self, version: u32) -> bool {
        (self.oldest_version..=self.version).contains(&version)
    }
}

/// Decodes a payload published as `version` into `E` (through its `previous` chain),
/// boxed for [`unbox`].
fn decode_any<E: DomainEvent>(
    version: u32,
    payload: &[u8],
) -> Option<Result<Box<dyn Any + Send>, serde_json::Error>> {
    let decoded = E::__upcast(version, payload)?;
    Some(decoded.map(|event| Box::new(event) as Box<dyn Any + Send>))
}

/// Unboxes what `decode_any::<E>` made.
pub(super) fn unbox<E: DomainEvent>(event: Box<dyn Any + Send>) -> Result<E, HandlerError> {
    event
        .downcast::<E>()
        .map(|event| *event)
        .map_err(|_| format!("internal: payload did not decode as {}", E::NAME).into())
}

/// A group's handlers, by event name, and the subject filters they cover.
#[derive(Clone)]
pub(super) struct Routes {
    /// The routes, by event name.
    by_name: HashMap<&'static str, Route>,
    /// The routes' filters, relative to the prefix, sorted, each once.
    filters: Vec<String>,
}

impl Routes {
    /// The routes of `group`, one per event name.
    pub fn new(group: &str, routes: Vec<Route>) -> Result<Routes, ConsumerError> {
        if routes.is_empty() {
            return Err(ConsumerError::NoHandlers(group.to_owned()));
        }
        let mut by_name: HashMap<&'static str, Route> = HashMap::new();
        for route in routes {
            let name = route.name;
            if by_name.insert(name, route).is_some() {
                return Err(ConsumerError::DuplicateHandler {
                    group: group.to_owned(),
                    event: name,
                });
            }
        }
        let mut filters: Vec<String> = by_name.values().map(|r| r.filter.clone()).collect();
        filters.sort();
        filters.dedup();
        Ok(Routes { by_name, filters })
    }

    /// The route of the event named `name`.
    pub fn get(&self, name: &str) -> Option<&Route> {
        self.by_name.get(name)
    }

    /// The names of the events routed.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_name.keys().copied()
    }

    /// The subject filters, relative to the prefix, sorted, each once.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }

    /// Whether `subject` (relative to the prefix) is one the group reads.
    pub fn covers(&self, subject: &str) -> bool {
        self.filters.iter().any(|f| subject_matches(f, subject))
    }
}

/// The subject filter of a subject template: each `{field}` token becomes `*`.
pub(super) fn filter_of(template: &str) -> String {
    template
        .split('.')
        .map(|token| if token.starts_with('{') { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether a subject can match both filters (`*` matches one token).
fn tokens_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(x, y)| x == y || *x == "*" || *y == "*")
}

/// Whether a subject can match two of the filters: JetStream refuses overlapping
/// filters on one consumer.
pub(super) fn any_overlap(filters: &[String]) -> bool {
    filters
        .iter()
        .enumerate()
        .any(|(i, a)| filters[i + 1..].iter().any(|b| tokens_overlap(a, b)))
}

/// Whether `subject` (relative to the prefix) matches `filter` (`*` matches one token).
pub(super) fn subject_matches(filter: &str, subject: &str) -> bool {
    let (f, s): (Vec<&str>, Vec<&str>) =
        (filter.split('.').collect(), subject.split('.').collect());
    f.len() == s.len() && f.iter().zip(&s).all(|(f, s)| *f == "*" || f == s)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A route for `name` that decodes anything and does nothing.
    pub(in crate::consumer) fn route(name: &'static str, version: u32, filter: &str) -> Route {
        Route {
            name,
            version,
            oldest_version: version,
            filter: filter.to_owned(),
            decode: |_, _| Some(Ok(Box::new(()))),
            call: Call::Plain(Arc::new(|_, _| Box::pin(async { Ok(()) }))),
        }
    }

    fn strings(filters: &[&str]) -> Vec<String> {
        filters.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn a_template_becomes_a_filter_with_a_wildcard_per_field() {
        assert_eq!(filter_of("lesson.published"), "lesson.published");
        assert_eq!(filter_of("quiz.{quiz_id}.submitted"), "quiz.*.submitted");
        assert_eq!(filter_of("{a}.x.{b}"), "*.x.*");
    }

    #[test]
    fn a_wildcard_matches_exactly_one_token() {
        assert!(subject_matches("quiz.*.submitted", "quiz.q1.submitted"));
        assert!(subject_matches("lesson.published", "lesson.published"));
        assert!(!subject_matches("quiz.*.submitted", "quiz.submitted"));
        assert!(!subject_matches("quiz.*.submitted", "quiz.a.b.submitted"));
        assert!(!subject_matches("quiz.*.submitted", "quiz.q1.graded"));
        assert!(!subject_matches("lesson.published", "lesson.published.x"));
        assert!(!subject_matches("lesson.published", "lesson"));
    }

    #[test]
    fn filters_overlap_when_one_subject_can_match_two() {
        assert!(!any_overlap(&strings(&[])));
        assert!(!any_overlap(&strings(&["quiz.*.submitted"])));
        assert!(!any_overlap(&strings(&[
            "lesson.published",
            "quiz.*.submitted",
            "quiz.*.graded"
        ])));
        assert!(any_overlap(&strings(&[
            "lesson.published",
            "quiz.*.graded",
            "quiz.q1.*"
        ])));
        assert!(any_overlap(&strings(&["a.*", "*.b"])));
        // Different lengths never overlap: `*` is one token, not `>`.
        assert!(!any_overlap(&strings(&["a.*", "a.*.c"])));
    }

    #[test]
    fn routes_refuse_no_handler_and_two_handlers_for_one_event() {
        let none = Routes::new("grading", Vec::new()).err().unwrap();
        assert!(matches!(none, ConsumerError::NoHandlers(group) if group == "grading"));
        let twice = Routes::new(
            "grading",
            vec![route("a.b", 1, "a.b"), route("a.b", 2, "a.b")],
        )
        .err()
        .unwrap();
        assert!(matches!(
            twice,
            ConsumerError::DuplicateHandler { group, event: "a.b" } if group == "grading"
        ));
    }

    #[test]
    fn routes_keep_each_filter_once_sorted_and_cover_their_subjects() {
        let routes = Routes::new(
            "grading",
            vec![
                route("quiz.submitted", 1, "quiz.*.submitted"),
                route("lesson.published", 1, "lesson.published"),
                route("quiz.resubmitted", 1, "quiz.*.submitted"),
            ],
        )
        .unwrap();
        assert_eq!(routes.filters(), ["lesson.published", "quiz.*.submitted"]);
        assert_eq!(routes.get("quiz.submitted").unwrap().version, 1);
        assert!(routes.get("quiz.graded").is_none());
        assert!(routes.covers("quiz.q9.submitted"));
        assert!(routes.covers("lesson.published"));
        assert!(!routes.covers("lesson.deleted"));
    }
}
