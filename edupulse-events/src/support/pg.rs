//! Postgres helpers: the error codes the library reacts to, how it tells them apart,
//! and the set-up of the sessions it holds for a long time.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// SQLSTATE codes the library reacts to.
pub(crate) mod code {
    /// `undefined_table`: a relation does not exist (not migrated).
    pub const UNDEFINED_TABLE: &str = "42P01";
    /// `invalid_schema_name`: the schema does not exist (not migrated).
    pub const INVALID_SCHEMA_NAME: &str = "3F000";
    /// `no_active_sql_transaction`.
    pub const NO_ACTIVE_TRANSACTION: &str = "25P01";
    /// The class of connection exceptions (`08xxx`).
    pub const CONNECTION_EXCEPTION_CLASS: &str = "08";
    /// `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`.
    pub const SHUTTING_DOWN: [&str; 3] = ["57P01", "57P02", "57P03"];
    /// `too_many_connections`.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}

/// The SQLSTATE of a database error, if `error` is one.
fn sqlstate(error: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    error.as_database_error().and_then(|e| e.code())
}

/// Whether `error` says the library's tables or schema do not exist: the database has
/// not been migrated.
pub(crate) fn is_undefined_table(error: &sqlx::Error) -> bool {
    sqlstate(error)
        .is_some_and(|code| code == code::UNDEFINED_TABLE || code == code::INVALID_SCHEMA_NAME)
}

/// Whether `error` says the connection is not in a transaction block.
pub(crate) fn is_no_transaction(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == code::NO_ACTIVE_TRANSACTION)
}

/// Whether a Postgres error means the database or the pool cannot be reached (rather
/// than something the statement did): a lost or refused connection, a pool that timed
/// out, a server shutting down or full.
pub(crate) fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(error).is_some_and(|code| {
            code.starts_with(code::CONNECTION_EXCEPTION_CLASS)
                || code::SHUTTING_DOWN.contains(&&*code)
                || code == code::TOO_MANY_CONNECTIONS
        }),
        _ => false,
    }
}

/// Server-side keepalives and a user timeout for a session held a long time.
const SESSION_SETUP: &str = "\
SET tcp_keepalives_idle = 10;
SET tcp_keepalives_interval = 5;
SET tcp_keepalives_count = 3;
SET tcp_user_timeout = 25000;";

/// Opens a session the library holds a long time (the relay's leader and marker). A
/// peer whose host vanishes sends no FIN: the set-up lets the server notice within
/// about 25 s (not the kernel's two hours) and free what the session held, the
/// leader's lock say. Ignored on a Unix socket; a failed set-up is logged, not fatal.
pub(crate) async fn open_session(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect_with(options).await?;
    if let Err(error) = sqlx::raw_sql(SESSION_SETUP).execute(&mut conn).await {
        tracing::warn!(%error, "could not set up a long-lived Postgres session");
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_io_failures_are_unavailability_and_others_are_not() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::PoolClosed));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
        assert!(!is_undefined_table(&sqlx::Error::RowNotFound));
        assert!(!is_no_transaction(&sqlx::Error::PoolTimedOut));
    }
}
