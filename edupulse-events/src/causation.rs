//! The event a handler is handling, kept in a task-local while it runs, so that the
//! events it emits are caused by it and join its conversation without the handler
//! passing anything by hand.

use std::future::Future;
use uuid::Uuid;

/// The event being handled, for the events a handler emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cause {
    /// Becomes the emitted events' causation id.
    pub event_id: Uuid,
    /// Becomes the emitted events' correlation id.
    pub correlation_id: Uuid,
}

impl Cause {
    /// The cause an event with this id and correlation id gives the events it causes:
    /// an event without a correlation id starts its own conversation.
    pub fn of(event_id: Uuid, correlation_id: Option<Uuid>) -> Cause {
        Cause {
            event_id,
            correlation_id: correlation_id.unwrap_or(event_id),
        }
    }

    /// Runs `work` with this as the current cause.
    pub async fn scope<T>(self, work: impl Future<Output = T>) -> T {
        CAUSE.scope(self, work).await
    }
}

tokio::task_local! {
    static CAUSE: Cause;
}

/// The event whose handler is running on this task, if any.
pub(crate) fn current() -> Option<Cause> {
    CAUSE.try_with(|cause| *cause).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cause_is_seen_inside_the_scope_only() {
        assert_eq!(current(), None);
        let id = Uuid::now_v7();
        let cause = Cause::of(id, None);
        assert_eq!(cause.correlation_id, id);
        let seen = cause.scope(async { current() }).await;
        assert_eq!(seen, Some(cause));
        assert_eq!(current(), None);
    }
}
