//! The inbox: the ids of the events a group's `on_tx` handlers have applied, recorded
//! in the handler's transaction so that each event's effects commit once, and pruned
//! after the retention.

use super::context::Ctx;
use super::ConsumerError;
use crate::support::pg::is_undefined_table;
use crate::support::sql::INBOX;
use const_format::formatcp;
use sqlx::{PgConnection, PgPool};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Fails if the inbox table does not exist.
const CHECK_INBOX: &str = formatcp!("SELECT 1 FROM {INBOX} LIMIT 0");

/// Records an event as applied by a group; affects no row if it already was.
const INSERT_INBOX: &str = formatcp!(
    "INSERT INTO {INBOX} (consumer_group, event_id) VALUES ($1, $2)
     ON CONFLICT DO NOTHING"
);

/// Deletes a batch of a group's inbox entries handled longer than `$2` µs ago (by the
/// database's clock), oldest first.
const PRUNE_INBOX: &str = formatcp!(
    "DELETE FROM {INBOX} WHERE consumer_group = $1 AND event_id IN (
        SELECT event_id FROM {INBOX}
        WHERE consumer_group = $1
          AND handled_at < now() - $2 * interval '1 microsecond'
        ORDER BY handled_at LIMIT {PRUNE_BATCH})"
);

/// How many entries one pruning statement deletes at most.
const PRUNE_BATCH: u64 = 1000;

/// At most this many statements per pruning round, so that a large backlog of old
/// entries is pruned over several rounds, never in one long burst.
const STATEMENTS_PER_ROUND: usize = 10;

/// How often the inbox is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Checks that the inbox table exists: [`ConsumerError::NotMigrated`] if not.
pub(super) async fn check_migrated(pool: &PgPool) -> Result<(), ConsumerError> {
    sqlx::query(CHECK_INBOX).execute(pool).await.map_err(|e| {
        if is_undefined_table(&e) {
            ConsumerError::NotMigrated
        } else {
            ConsumerError::Database(e)
        }
    })?;
    Ok(())
}

/// Records `event_id` as applied by `group`, in the handler's transaction `tx`: false if
/// it already was (a duplicate delivery).
pub(super) async fn record(
    tx: &mut PgConnection,
    group: &str,
    event_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(INSERT_INBOX)
        .bind(group)
        .bind(event_id)
        .execute(tx)
        .await?;
    Ok(inserted.rows_affected() > 0)
}

/// Prunes the group's inbox now and every [`PRUNE_EVERY`], until aborted.
pub(super) fn spawn_pruner(ctx: Arc<Ctx>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match prune_inbox(&ctx).await {
                Ok(deleted) if deleted > 0 => tracing::debug!(deleted, "pruned the inbox"),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "inbox pruning failed; trying later"),
            }
            tokio::time::sleep(PRUNE_EVERY).await;
        }
    })
}

/// Deletes inbox entries handled longer than the retention ago, in bounded batches
/// and at most [`STATEMENTS_PER_ROUND`] statements.
async fn prune_inbox(ctx: &Ctx) -> Result<u64, sqlx::Error> {
    let retention = i64::try_from(ctx.settings.inbox_retention.as_micros()).unwrap_or(i64::MAX);
    let mut total = 0;
    for _ in 0..STATEMENTS_PER_ROUND {
        let deleted = sqlx::query(PRUNE_INBOX)
            .bind(&ctx.group)
            .bind(retention)
            .execute(&ctx.inner.pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < PRUNE_BATCH {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_inbox_table() {
        assert_eq!(CHECK_INBOX, "SELECT 1 FROM edupulse.inbox LIMIT 0");
        assert!(INSERT_INBOX.starts_with("INSERT INTO edupulse.inbox "));
        assert!(PRUNE_INBOX.contains("SELECT event_id FROM edupulse.inbox"));
        assert!(PRUNE_INBOX.contains("handled_at < now()"), "{PRUNE_INBOX}");
        assert!(
            PRUNE_INBOX.ends_with("ORDER BY handled_at LIMIT 1000)"),
            "{PRUNE_INBOX}"
        );
    }
}
