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

mod event;
mod registry;

pub use edupulse_events_derive::DomainEvent;
pub use event::{check_token, DomainEvent, SubjectError, TokenProblem, MAX_TOKEN_LEN};
pub use registry::{
    registry, DecodeError, DecodedEvent, DuplicateName, EventType, Registry, RegistryError,
};

/// What generated code uses. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::event::{push_field, push_literal};
    pub use crate::registry::EventType;
    pub use inventory;
}
