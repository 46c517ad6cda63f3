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

/// Deletes a batch of a group's inbox entries below an event id.
const PRUNE_INBOX: &str = formatcp!(
    "DELETE FROM {INBOX} WHERE consumer_group = $1 AND event_id IN (
        SELECT event_id FROM {INBOX}
        WHERE consumer_group = $1 AND event_id < $2
        ORDER BY event_id LIMIT {PRUNE_BATCH})"
);

/// How many entries one pruning statement deletes at most.
const PRUNE_BATCH: u64 = 1000;

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

/// Deletes inbox entries of events older than the retention, in bounded batches.
/// Event ids are UUID v7, so "older" is a range of the primary key.
async fn prune_inbox(ctx: &Ctx) -> Result<u64, sqlx::Error> {
    let bound = oldest_kept(std::time::SystemTime::now(), ctx.settings.inbox_retention);
    let mut total = 0;
    loop {
        let deleted = sqlx::query(PRUNE_INBOX)
            .bind(&ctx.group)
            .bind(bound)
            .execute(&ctx.inner.pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < PRUNE_BATCH {
            return Ok(total);
        }
    }
}

/// The smallest v7 id of the millisecond `retention` before `now`: every id below it
/// is older.
fn oldest_kept(now: std::time::SystemTime, retention: Duration) -> Uuid {
    let cutoff = now.checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH);
    let since_epoch = cutoff
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let millis = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn statements_name_the_inbox_table() {
        assert_eq!(CHECK_INBOX, "SELECT 1 FROM edupulse.inbox LIMIT 0");
        assert!(INSERT_INBOX.starts_with("INSERT INTO edupulse.inbox "));
        assert!(PRUNE_INBOX.contains("SELECT event_id FROM edupulse.inbox"));
        assert!(PRUNE_INBOX.ends_with("LIMIT 1000)"), "{PRUNE_INBOX}");
    }

    #[test]
    fn the_prune_bound_is_the_first_v7_id_of_the_cutoff_millisecond() {
        let now = UNIX_EPOCH + Duration::from_millis(10_000_123);
        let bound = oldest_kept(now, Duration::from_millis(123));
        assert_eq!(bound.get_version_num(), 7);
        let (secs, nanos) = bound.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos), (10_000, 0));
        // An id of the cutoff millisecond is kept; one of the millisecond before is not.
        let at = uuid::Builder::from_unix_timestamp_millis(10_000_000, &[0; 10]).into_uuid();
        let before = uuid::Builder::from_unix_timestamp_millis(9_999_999, &[0xff; 10]).into_uuid();
        assert!(at >= bound);
        assert!(before < bound);
    }

    #[test]
    fn a_retention_longer_than_the_epoch_prunes_nothing() {
        let bound = oldest_kept(SystemTime::now(), Duration::from_secs(u64::MAX));
        let (secs, nanos) = bound.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos), (0, 0));
    }
}
