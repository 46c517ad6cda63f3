//! Domain events for Rust services: define an event as a plain struct, emit it inside
//! the business transaction, and let the framework deliver it.
//!
//! ```
//! use edupulse_events::DomainEvent;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! #[event(name = "lesson.published")]
//! pub struct LessonPublished {
//!     pub lesson_id: u64,
//!     pub title: String,
//! }
//!
//! let entry = edupulse_events::registry().get("lesson.published").unwrap();
//! assert_eq!(entry.version(), 1);
//! assert!(entry.is::<LessonPublished>());
//! ```
#![warn(missing_docs)]

mod causation;
mod config;
mod consumer;
mod event;
mod migrate;
mod outbox;
mod registry;
mod relay;
mod service;
mod subject;
mod support;
mod wire;

pub use config::{
    Config, ConfigBuilder, ConfigError, NatsAuth, NatsTls, StreamPlacement, DEFAULT_NATS_URL,
    DEFAULT_SOURCE, DEFAULT_STREAM, DEFAULT_SUBJECT_PREFIX, MAX_STREAM_REPLICAS,
};
pub use consumer::{
    ConsumerBuilder, ConsumerError, ConsumerErrorKind, ConsumerHandle, ConsumerSettings,
    DeadLetter, DeadReason, Envelope, HandlerError, ParseDeadReasonError, Received, StartFrom,
};
pub use edupulse_events_derive::DomainEvent;
pub use event::{DomainEvent, SubjectError};
pub use migrate::{grants_sql, migrator, MigrateError};
pub use outbox::{
    DeadEvent, EmitError, EmitErrorKind, EventState, OutboxStatus, Outgoing, Requeue,
};
pub use registry::{
    registry, DecodeError, DecodedEvent, DuplicateName, EventType, Registry, RegistryError,
};
pub use relay::{RelayError, RelayHandle, RelaySettings};
pub use service::{ConnectError, ConnectErrorKind, EventService};
pub use subject::{check_token, TokenProblem, MAX_TOKEN_LEN};
pub use support::sql::SCHEMA;
pub use uuid::Uuid;
pub use wire::headers;

/// What generated code uses. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::event::{push_field, push_literal};
    pub use crate::registry::EventType;
    pub use inventory;
}
