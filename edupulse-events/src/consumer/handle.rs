//! Calling a handler once: in its `on_tx` transaction with the inbox record, within
//! `handler_timeout`, its panics caught, and what went wrong told apart (the handler's
//! failure, or a database that cannot be reached, which is not its fault).

use super::context::Ctx;
use super::envelope::Envelope;
use super::inbox;
use super::route::{Call, Route, TxCall};
use crate::support::pg::{is_unavailable, Within};
use crate::HandlerError;
use futures::FutureExt;
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// The text of a panic's payload, as `panic!` writes it.
pub(super) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// How one call of a handler went.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The handler succeeded (and its transaction committed).
    Handled,
    /// The inbox already had the event: the handler was not called.
    Duplicate,
    /// The handler failed: counts toward `max_deliveries`.
    Failed(String),
    /// The handler (or the event's `Deserialize`) panicked: counts toward
    /// `max_deliveries`, and the dead letter says so.
    Panicked(String),
    /// The framework could not reach Postgres (begin, inbox insert, commit): retried
    /// without counting toward `max_deliveries`.
    Unavailable(String),
    /// The instance "died" after the commit (a simulated crash).
    #[cfg(feature = "test-hooks")]
    Crashed,
}

/// The outcome of a failed framework statement: [`Outcome::Unavailable`] if Postgres
/// could not be reached, else [`Outcome::Failed`].
pub(super) fn framework_failure(what: &str, error: &sqlx::Error) -> Outcome {
    let why = format!("{what}: {error}");
    if is_unavailable(error) {
        Outcome::Unavailable(why)
    } else {
        Outcome::Failed(why)
    }
}

/// Calls the event's handler once.
pub(super) async fn handle(
    ctx: &Ctx,
    route: &Route,
    event: Box<dyn Any + Send>,
    envelope: Envelope,
) -> Outcome {
    match &route.call {
        Call::Plain(call) => match guarded(ctx, call(event, envelope)).await {
            Ok(()) => Outcome::Handled,
            Err(outcome) => outcome,
        },
        Call::Tx(call) => handle_tx(ctx, call, event, envelope).await,
    }
}

/// Runs a handler's call with its time limit, catching a panic: the outcome of a
/// failure, or of a panic, or of an error caused by a database that cannot be reached
/// (a pool timeout while the handler emits, say: not the handler's fault).
async fn guarded(
    ctx: &Ctx,
    call: impl Future<Output = Result<(), HandlerError>>,
) -> Result<(), Outcome> {
    let limit = ctx.settings.handler_timeout;
    match tokio::time::timeout(limit, AssertUnwindSafe(call).catch_unwind()).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(handler_failure(error.as_ref())),
        Ok(Err(panic)) => Err(Outcome::Panicked(format!(
            "the handler panicked: {}",
            panic_message(panic.as_ref())
        ))),
        Err(_) => Err(timed_out(ctx, limit).await),
    }
}

/// The outcome of a handler that did not finish in time: its failure, unless Postgres
/// does not answer either (a stalled connection, say), which is not the handler's
/// fault.
async fn timed_out(ctx: &Ctx, limit: Duration) -> Outcome {
    let why = format!("the handler did not finish within handler_timeout ({limit:?})");
    let probe = sqlx::query("SELECT 1")
        .execute(&ctx.inner.pool)
        .within(ctx.settings.statement_timeout)
        .await;
    match probe {
        Ok(_) => Outcome::Failed(why),
        Err(error) => Outcome::Unavailable(format!("{why}, and Postgres does not answer: {error}")),
    }
}

/// What a handler's error means: a failure of the handler, unless it was caused by a
/// database that cannot be reached (then retried without counting).
fn handler_failure(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Outcome {
    let why = error.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current
            .downcast_ref::<sqlx::Error>()
            .is_some_and(is_unavailable)
        {
            return Outcome::Unavailable(why);
        }
        cause = current.source();
    }
    Outcome::Failed(why)
}

/// Calls an `on_tx` handler once, in a transaction that records the event in the
/// inbox first: a duplicate is rolled back without calling the handler.
async fn handle_tx(
    ctx: &Ctx,
    call: &TxCall,
    event: Box<dyn Any + Send>,
    envelope: Envelope,
) -> Outcome {
    let limit = ctx.settings.statement_timeout;
    let mut tx = match ctx.inner.pool.begin().within(limit).await {
        Ok(tx) => tx,
        Err(error) => return framework_failure("cannot begin a transaction", &error),
    };
    match inbox::record(&mut tx, &ctx.group, envelope.id)
        .within(limit)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            let _ = tx.rollback().await;
            return Outcome::Duplicate;
        }
        Err(error) => return framework_failure("cannot record the event in the inbox", &error),
    }
    if let Err(outcome) = guarded(ctx, call(&mut tx, event, envelope)).await {
        let _ = tx.rollback().within(limit).await;
        return outcome;
    }
    if let Err(error) = tx.commit().within(limit).await {
        // If the commit did happen, the retry finds the event in the inbox.
        return framework_failure("cannot commit the handler's transaction", &error);
    }
    #[cfg(feature = "test-hooks")]
    if ctx.crash_if_asked() {
        return Outcome::Crashed;
    }
    Outcome::Handled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_postgres_is_an_outage_and_other_errors_a_failure() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        for error in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed, io] {
            let outcome = framework_failure("cannot begin a transaction", &error);
            assert_eq!(
                outcome,
                Outcome::Unavailable(format!("cannot begin a transaction: {error}"))
            );
        }
        for error in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
        ] {
            let outcome = framework_failure("cannot commit", &error);
            assert_eq!(outcome, Outcome::Failed(format!("cannot commit: {error}")));
        }
    }

    #[test]
    fn a_handler_error_caused_by_an_unreachable_database_is_not_the_handlers_failure() {
        let pool_timeout: HandlerError =
            Box::new(crate::EmitError::Database(sqlx::Error::PoolTimedOut));
        assert!(matches!(
            handler_failure(pool_timeout.as_ref()),
            Outcome::Unavailable(_)
        ));
        let direct: HandlerError = Box::new(sqlx::Error::PoolTimedOut);
        assert!(matches!(
            handler_failure(direct.as_ref()),
            Outcome::Unavailable(_)
        ));
        let own: HandlerError = "the quiz is closed".into();
        assert_eq!(
            handler_failure(own.as_ref()),
            Outcome::Failed("the quiz is closed".into())
        );
        let query: HandlerError = Box::new(sqlx::Error::RowNotFound);
        assert!(matches!(
            handler_failure(query.as_ref()),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn a_panics_message_is_kept() {
        let text = std::panic::catch_unwind(|| panic!("static text")).unwrap_err();
        assert_eq!(panic_message(text.as_ref()), "static text");
        let formatted = std::panic::catch_unwind(|| panic!("id {}", 7)).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()), "id 7");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(panic_message(other.as_ref()), "a panic without a message");
    }
}
