//! Contracts for other teams: a JSON Schema for each event type, the service's AsyncAPI
//! 3.0 document, and a check that published schemas only change in ways their
//! consumers can still read. Needs the `schema` feature.
//!
//! An event type opts in with `schema` in its `#[event(...)]` attribute and a
//! `JsonSchema` derive (schemars comes re-exported as [`crate::schemars`], so
//! no extra dependency is needed):
//!
//! ```
//! use edupulse_events::schemars::{self, JsonSchema};
//! use edupulse_events::{contract, DomainEvent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, JsonSchema, DomainEvent)]
//! #[event(name = "lesson.published", subject = "lesson.{course_id}.published", schema)]
//! pub struct LessonPublished {
//!     pub course_id: u64,
//!     pub title: String,
//! }
//!
//! let schema = contract::schema_of::<LessonPublished>().unwrap();
//! assert_eq!(schema.id(), "urn:edupulse:lesson.published:v1");
//! assert_eq!(schema.schema()["required"], serde_json::json!(["course_id", "title"]));
//! # use edupulse_events::serde_json;
//! ```
//!
//! - [`schemas`] lists every event type with a schema, [`EventSchema::schema`] gives it
//!   (JSON Schema draft-07, describing the JSON a reader of the type accepts: `Option`
//!   fields and fields with a serde default are optional; everything the service sends
//!   is valid by it).
//! - [`asyncapi`] builds the AsyncAPI 3.0 document of the service's events.
//! - [`check_schemas`] keeps the schemas of published versions as files and fails on a
//!   change that old consumers cannot read.
//! - With the feature on, each message of a type with a schema carries the CloudEvents
//!   `dataschema` attribute ([`headers::DATA_SCHEMA`](crate::headers::DATA_SCHEMA)),
//!   the schema's [`id`](EventSchema::id).

mod asyncapi;
mod check;
mod schema;

pub use asyncapi::asyncapi;
pub use check::{
    changes, check_schemas, check_schemas_in, Change, ChangeKind, CheckMode, CheckReport,
    ContractError, FileOutcome, Incompatible, Outcome, SCHEMAS_ENV,
};
pub use schema::{schema_id, schema_of, schemas, EventSchema};

pub(crate) use schema::dataschema;
