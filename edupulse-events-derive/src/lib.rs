//! The derive macro behind `#[derive(DomainEvent)]`.
//!
//! Do not depend on this crate directly: use `edupulse_events::DomainEvent`, which
//! re-exports the derive beside the trait it implements.

// How it works (for maintainers): the derive is a pipeline, in the style of
// thiserror's. `ast` reads the item into typed input that keeps the original syntax
// for spans, `attr` reads the `#[event(...)]` attributes, `valid` checks the name and
// subject rules, `expand` writes the impl and the registration, and `fallback` writes
// a stub impl beside the errors when anything is wrong, so the user sees the real
// mistakes and no cascade. Every error of one item is collected in a `ctxt::Ctxt` and
// reported in one build.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod fallback;
mod valid;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Derives `edupulse_events::DomainEvent` for a struct.
///
/// ```text
/// #[derive(Serialize, Deserialize, DomainEvent)]
/// #[event(name = "quiz.submitted", version = 2, subject = "quiz.{quiz_id}.submitted")]
/// pub struct QuizSubmitted { pub quiz_id: Uuid, pub score: f32 }
/// ```
///
/// Keys of `#[event(...)]`: `name` (required), `version` (default 1), `previous` (on
/// version 2 or later, the type of the version before, from which the struct
/// implements `From`), `subject` (default: the name), `crate` (the path to
/// edupulse-events, default `::edupulse_events`) and `schema` (register the type's JSON
/// Schema; needs the `schema` feature and `#[derive(JsonSchema)]`). See the
/// `edupulse_events::DomainEvent`
/// trait for the rules.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}
