//! The outbox's schema, embedded from `migrations/` and applied by
//! [`EventService::migrate`](crate::EventService::migrate).

use crate::support::pg::is_undefined_table;
use crate::support::sql::{MIGRATIONS, SCHEMA};
use const_format::formatcp;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

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
#[derive(thiserror::Error)]
#[error("migrating the edupulse outbox schema failed: {0}; check that the database user may create schemas and tables, and that edupulse._migrations was not edited by hand")]
pub struct MigrateError(#[from] pub sqlx::migrate::MigrateError);

/// The migrations applied successfully, with their checksums.
const APPLIED: &str = formatcp!("SELECT version, checksum FROM {MIGRATIONS} WHERE success");

/// Whether every migration is applied with the checksum it has now: then migrating has
/// nothing to do, and needs no right to create anything (a role with only the grants
/// of `grants.sql` may call it at start-up).
pub(crate) async fn up_to_date(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<(i64, Vec<u8>)> = match sqlx::query_as(APPLIED).fetch_all(pool).await {
        Ok(applied) => applied,
        Err(error) if is_undefined_table(&error) => return Ok(false),
        Err(error) => return Err(error),
    };
    let applied: std::collections::HashMap<i64, Vec<u8>> = applied.into_iter().collect();
    Ok(migrator().iter().all(|migration| {
        applied
            .get(&migration.version)
            .is_some_and(|checksum| *checksum == *migration.checksum)
    }))
}

/// Applies the migrations unless every one is applied already (then it only reads).
pub(crate) async fn run(pool: &PgPool) -> Result<(), MigrateError> {
    if up_to_date(pool).await.unwrap_or(false) {
        return Ok(());
    }
    migrator().run(pool).await?;
    Ok(())
}

/// The grants that give each part of the library only the privileges it needs, as
/// SQL: four roles (`edupulse_migrator`, `edupulse_writer`, `edupulse_relay`,
/// `edupulse_consumer`), created if missing. Run it as a superuser or the schema's
/// owner after migrating, and again after an upgrade that adds migrations; then grant
/// the roles to your login roles (`GRANT edupulse_writer TO web_app;`). The README's
/// "Least privilege" section says what each role may do.
pub fn grants_sql() -> &'static str {
    include_str!("../sql/grants.sql")
}

crate::support::debug_as_display!(MigrateError);
