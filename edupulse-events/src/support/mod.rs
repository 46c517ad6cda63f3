//! Leaves shared by the outbox, the relay and the consumer. Nothing here imports
//! anything else of the crate, so the three can use it without importing each other.

pub(crate) mod pg;
pub(crate) mod range;
pub(crate) mod retry;
pub(crate) mod sql;
