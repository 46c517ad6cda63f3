//! The names of the library's tables, sequences and notification channel, each written
//! once. Statements are built from them at compile time with
//! [`const_format::formatcp`], so `"{OUTBOX}"` in a statement reads as the table.

use const_format::formatcp;

/// The schema that holds the outbox and the library's migrations table.
pub const SCHEMA: &str = "edupulse";

/// The outbox: one row per emitted event.
pub(crate) const OUTBOX: &str = formatcp!("{SCHEMA}.outbox");
/// The outbox's sequence, which orders events (`seq`).
pub(crate) const OUTBOX_SEQ: &str = formatcp!("{SCHEMA}.outbox_seq_seq");
/// The view of events still to publish (migration 5).
pub(crate) const PENDING_EVENTS: &str = formatcp!("{SCHEMA}.pending_events");
/// The relay's published mark (migration 4).
pub(crate) const RELAY_PROGRESS: &str = formatcp!("{SCHEMA}.relay_progress");
/// Whether the leading relay waits for notifications (migration 3).
pub(crate) const RELAY_IDLE: &str = formatcp!("{SCHEMA}.relay_idle");
/// Handled event ids per consumer group (migration 2).
pub(crate) const INBOX: &str = formatcp!("{SCHEMA}.inbox");
/// Messages a consumer group could not handle (migration 2).
pub(crate) const DEAD_LETTERS: &str = formatcp!("{SCHEMA}.dead_letters");
/// The library's own migrations table.
pub(crate) const MIGRATIONS: &str = formatcp!("{SCHEMA}._migrations");

/// The channel an emitting transaction notifies at commit, and the relay listens on.
pub(crate) const CHANNEL: &str = "edupulse_outbox";

/// Notifies the relay at commit: `pg_notify` on [`CHANNEL`].
pub(crate) const NOTIFY: &str = formatcp!("SELECT pg_catalog.pg_notify('{CHANNEL}', '')");

/// A subquery that notifies the relay only while it says it is idle; its value (a
/// count, 0 or 1) is of no use. Spliced into the emitting statements.
pub(crate) const NOTIFY_IF_IDLE: &str = formatcp!(
    "(SELECT count(pg_catalog.pg_notify('{CHANNEL}', '')) FROM {RELAY_IDLE} WHERE last_value = 1)"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_built_from_the_schema() {
        assert_eq!(OUTBOX, "edupulse.outbox");
        assert_eq!(MIGRATIONS, "edupulse._migrations");
        assert_eq!(NOTIFY, "SELECT pg_catalog.pg_notify('edupulse_outbox', '')");
        assert!(NOTIFY_IF_IDLE.contains("FROM edupulse.relay_idle WHERE last_value = 1"));
    }
}
