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
//!
//! A whole service needs `edupulse-events`, `serde` and `tokio` in its `Cargo.toml`,
//! nothing else: `sqlx` (and `time`, `uuid`, `async_nats`, `serde_json`) come
//! re-exported, at the versions this crate is built with.
//!
//! ```no_run
//! use edupulse_events::sqlx;
//! use edupulse_events::{Config, DomainEvent, EventService, Received};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, DomainEvent)]
//! #[event(name = "lesson.published")]
//! struct LessonPublished { lesson_id: i64 }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let service = EventService::connect(Config::from_env()?).await?;
//!     service.migrate().await?;
//!     let relay = service.start_relay().await?;
//!     let consumer = service
//!         .consumer("indexer")
//!         .on(|received: Received<LessonPublished>| async move {
//!             println!("lesson {} published at {}", received.event.lesson_id, received.envelope.time);
//!             Ok(())
//!         })
//!         .start()
//!         .await?;
//!     let mut tx = service.pool().begin().await?;
//!     sqlx::query("UPDATE lessons SET published = true WHERE id = $1")
//!         .bind(7_i64)
//!         .execute(&mut *tx)
//!         .await?;
//!     service.emit_in(&mut tx, LessonPublished { lesson_id: 7 }).await?;
//!     tx.commit().await?;
//!     consumer.shutdown().await?;
//!     relay.shutdown().await?;
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]

mod causation;
mod config;
mod consumer;
#[cfg(feature = "schema")]
pub mod contract;
mod event;
mod migrate;
mod outbox;
mod registry;
mod relay;
mod service;
mod subject;
mod support;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;

// The crates whose types appear in this crate's API, so that a service depends on
// `edupulse-events` (and `serde`, `tokio`) alone, at versions that match.
pub use async_nats;
#[cfg(feature = "schema")]
pub use schemars;
pub use serde_json;
pub use sqlx;
pub use time;
pub use uuid;

pub use config::{
    Config, ConfigBuilder, ConfigError, NatsAuth, NatsTls, StreamPlacement, DEFAULT_NATS_URL,
    DEFAULT_SOURCE, DEFAULT_STREAM, DEFAULT_SUBJECT_PREFIX, MAX_STREAM_REPLICAS,
};
pub use consumer::{
    ConsumerBuilder, ConsumerError, ConsumerErrorKind, ConsumerHandle, ConsumerSettings,
    ConsumerStatus, DeadLetter, DeadReason, Envelope, HandlerError, ParseDeadReasonError, Received,
    Replay, StartFrom, TxHandlerFn,
};
pub use edupulse_events_derive::DomainEvent;
pub use event::{DomainEvent, SubjectError};
pub use migrate::{grants_sql, migrator, MigrateError};
pub use outbox::{
    DeadEvent, EmitError, EmitErrorKind, Emitter, EventState, OutboxError, OutboxStatus, Outgoing,
    Requeue, DEFAULT_MAX_MESSAGE_SIZE,
};
pub use registry::{
    registry, DecodeError, DecodedEvent, DuplicateName, EventType, MissingPredecessor, Registry,
    RegistryError,
};
pub use relay::{
    AtomicBatches, RelayError, RelayHandle, RelaySettings, RelayStatus, RELAY_LEADER_LOCK,
};
pub use service::{ConnectError, ConnectErrorKind, EventService};
pub use subject::{check_token, TokenProblem, MAX_TOKEN_LEN};
pub use support::sql::SCHEMA;
pub use uuid::Uuid;
pub use wire::headers;

/// What generated code uses. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::event::{push_field, push_literal, same_str, Previous, UpcastFrom};
    pub use crate::registry::EventType;
    pub use inventory;

    pub use crate::__event_schema as event_schema;
    #[cfg(feature = "schema")]
    pub use crate::contract::EventSchema;
}

/// What `#[event(..., schema)]` expands to without the `schema` feature.
#[cfg(not(feature = "schema"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __event_schema {
    ($ty:ident) => {
        ::core::compile_error!(
            "`#[event(..., schema)]` needs the `schema` feature of edupulse-events: in \
             Cargo.toml, write `edupulse-events = { version = \"0.1\", features = [\"schema\"] }`"
        );
    };
}
