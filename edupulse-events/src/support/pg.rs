//! Postgres helpers: the error codes the library reacts to, how it tells them apart,
//! and the set-up of the sessions it holds for a long time.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::future::Future;
use std::time::Duration;

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
    /// `lock_not_available`.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
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

/// Whether `error` is Postgres' `lock_not_available`: a lock wait passed
/// `lock_timeout`.
pub(crate) fn is_lock_timeout(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code == code::LOCK_NOT_AVAILABLE)
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

/// A client-side deadline for a statement of the library's own: a connection that
/// stalls (no reset, no answer) would otherwise hang its caller for ever, since the
/// client sends no keepalives. Past the deadline the statement fails as an I/O error
/// (the connection is then taken for dead and dropped).
pub(crate) trait Within<T>: Future<Output = Result<T, sqlx::Error>> + Sized {
    /// This statement, failing with a timed-out I/O error after `limit`.
    async fn within(self, limit: Duration) -> Result<T, sqlx::Error> {
        match tokio::time::timeout(limit, self).await {
            Ok(result) => result,
            Err(_) => Err(stalled(limit)),
        }
    }
}

impl<T, F: Future<Output = Result<T, sqlx::Error>>> Within<T> for F {}

/// The error of a statement that had no answer within `limit`.
pub(crate) fn stalled(limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("Postgres did not answer within {limit:?}; the connection is taken for dead"),
    ))
}

/// Opens a session the library holds a long time (the relay's leader and marker). A
/// peer whose host vanishes sends no FIN: the set-up lets the server notice within
/// about 25 s (not the kernel's two hours) and free what the session held, the
/// leader's lock say. Ignored on a Unix socket; a failed set-up is logged, not fatal.
/// Connecting and the set-up each take at most `limit`.
pub(crate) async fn open_session(
    options: &PgConnectOptions,
    limit: Duration,
) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect_with(options).within(limit).await?;
    if let Err(error) = sqlx::raw_sql(SESSION_SETUP)
        .execute(&mut conn)
        .within(limit)
        .await
    {
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

    #[tokio::test]
    async fn a_statement_without_an_answer_fails_as_unavailable_at_its_deadline() {
        let never = std::future::pending::<Result<(), sqlx::Error>>();
        let error = never.within(Duration::from_millis(10)).await.unwrap_err();
        assert!(is_unavailable(&error), "{error}");
        assert!(error.to_string().contains("did not answer"), "{error}");
        let quick = async { Ok::<_, sqlx::Error>(7) };
        assert_eq!(quick.within(Duration::from_millis(10)).await.unwrap(), 7);
    }
}
