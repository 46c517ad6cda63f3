//! The outbox's schema, embedded from `migrations/` and applied by
//! [`EventService::migrate`](crate::EventService::migrate).

use crate::support::sql::{MIGRATIONS, SCHEMA};
use sqlx::migrate::Migrator;

/// The library's migrations, tracked in `edupulse._migrations` so that they never mix
/// with the application's own `_sqlx_migrations`. sqlx serializes concurrent runs with a
/// Postgres advisory lock, so two processes may migrate at once.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.create_schema(SCHEMA);
    migrator.dangerous_set_table_name(MIGRATIONS);
    migrator
}

/// Migrating the outbox schema failed.
#[derive(Debug, thiserror::Error)]
#[error("migrating the edupulse outbox schema failed: {0}; check that the database user may create schemas and tables, and that edupulse._migrations was not edited by hand")]
pub struct MigrateError(#[from] pub sqlx::migrate::MigrateError);
