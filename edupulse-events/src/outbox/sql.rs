//! The statements that write events, built from the table names in
//! [`crate::support::sql`].

use super::wake::HOLD_CLASS;
use crate::support::sql::{CHANNEL, NOTIFY_IF_IDLE, OUTBOX, RELAY_IDLE};
use const_format::formatcp;

/// How many events one `emit_all` statement writes at most; larger batches are split
/// into several statements of the same transaction.
pub(super) const BATCH_CHUNK: usize = 5_000;

const COLUMNS: &str =
    "(id, name, version, subject, payload, source, correlation_id, causation_id, traceparent, occurred_at)";

/// One event; `$11`, when not null, is the most bytes its JSONB body may print to
/// (see `printed_fits`): a larger one is not written, and no row comes back.
macro_rules! insert_one {
    ($notify:expr, $returning:expr) => {
        formatcp!(
            "INSERT INTO {OUTBOX} {COLUMNS}
SELECT $1, $2, $3, $4, x.p, $6, $7, $8, $9, $10
FROM (SELECT CAST($5::text AS jsonb) AS p{}) AS x
WHERE CASE WHEN $11::int8 IS NULL THEN true ELSE octet_length(x.p::text) <= $11 END
RETURNING seq{}",
            $notify,
            $returning
        )
    };
}

pub(super) const INSERT_ONE: &str = insert_one!("", "");
pub(super) const INSERT_ONE_NOTIFY: &str = insert_one!(formatcp!(", {NOTIFY_IF_IDLE} AS n"), "");
/// While the relay says it is idle, one writer at a time notifies in its own
/// transaction: the one that holds the notifier's lock ([`HOLD_CLASS`], 0), which it
/// keeps until its transaction ends. Notifying commits then never queue for Postgres'
/// notify lock behind each other, and a writer alone wakes the relay with its commit,
/// at no extra round trip. The others leave the wake-up to the emitter's waker: the
/// `$else` expression, which says `true` for "ask the waker" and `false` when it
/// notified in the transaction after all. `null` while the relay is busy.
macro_rules! wake_if_idle {
    ($else:expr) => {
        formatcp!(
            "(SELECT CASE WHEN pg_catalog.pg_try_advisory_xact_lock({HOLD_CLASS}, 0)
                   THEN (SELECT false FROM pg_catalog.pg_notify('{CHANNEL}', ''))
                   ELSE {} END
       FROM {RELAY_IDLE} WHERE last_value = 1)",
            $else
        )
    };
}

/// One event in a transaction of the emitter's own: unless it notifies, says `true` in
/// `wake` for a wake-up by the waker after the commit.
pub(super) const INSERT_ONE_IDLE: &str =
    insert_one!("", formatcp!(", {} AS wake", wake_if_idle!("true")));

/// One event in the caller's transaction, whose end the waker waits for: unless it
/// notifies, also takes the shared advisory lock ([`HOLD_CLASS`], `$12`) that the
/// transaction holds until it ends, and says `true` in `wake`. Should another session
/// hold that key already (an application's lock of the same class), it notifies in the
/// transaction instead.
pub(super) const INSERT_ONE_HOLD: &str = insert_one!(
    "",
    formatcp!(
        ", {} AS wake",
        wake_if_idle!(formatcp!(
            "CASE WHEN pg_catalog.pg_try_advisory_xact_lock_shared({HOLD_CLASS}, $12::int4)
                   THEN true
                   ELSE (SELECT false FROM pg_catalog.pg_notify('{CHANNEL}', '')) END"
        ))
    )
);

/// A batch of one event type, checking each body's printed size (`$8`, null where no
/// check is needed): all are written, or none if one is too large. `$notify` is
/// spliced into the size check, which runs once.
macro_rules! insert_many {
    ($notify:expr) => {
        formatcp!(
            "WITH input AS (
    SELECT u.id, u.subject, CAST(u.payload AS jsonb) AS p, u.correlation_id, u.causation_id,
           u.traceparent, u.occurred_at, u.body_limit, u.ord
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
                $7::timestamptz[], $8::int8[])
         WITH ORDINALITY AS u(id, subject, payload, correlation_id, causation_id, traceparent,
                              occurred_at, body_limit, ord)
), too_large AS (
    SELECT count(*) AS n{} FROM input
    WHERE CASE WHEN body_limit IS NULL THEN false ELSE octet_length(p::text) > body_limit END
)
INSERT INTO {OUTBOX} {COLUMNS}
SELECT id, $9, $10, subject, p, $11, correlation_id, causation_id, traceparent, occurred_at
FROM input
WHERE (SELECT n FROM too_large) = 0
ORDER BY ord",
            $notify
        )
    };
}

pub(super) const INSERT_MANY: &str = insert_many!("");
pub(super) const INSERT_MANY_NOTIFY: &str =
    insert_many!(formatcp!(", {NOTIFY_IF_IDLE} AS notified"));

/// The batch insert when no event needs Postgres' size check (the usual case): one
/// pass over the input, nothing materialised; `$notify` is a condition run once.
macro_rules! insert_many_unchecked {
    ($notify:expr) => {
        formatcp!(
            "INSERT INTO {OUTBOX} {COLUMNS}
SELECT u.id, $8, $9, u.subject, CAST(u.payload AS jsonb), $10, u.correlation_id,
       u.causation_id, u.traceparent, u.occurred_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
            $7::timestamptz[])
     WITH ORDINALITY AS u(id, subject, payload, correlation_id, causation_id, traceparent,
                          occurred_at, ord){}
ORDER BY u.ord",
            $notify
        )
    };
}

pub(super) const INSERT_MANY_UNCHECKED: &str = insert_many_unchecked!("");
pub(super) const INSERT_MANY_UNCHECKED_NOTIFY: &str =
    insert_many_unchecked!(formatcp!("\nWHERE {NOTIFY_IF_IDLE} >= 0"));

/// The printed size of each JSON text as JSONB, in order.
pub(super) const JSONB_SIZES: &str = "\
SELECT octet_length(CAST(u.p AS jsonb)::text)::int8
FROM unnest($1::text[]) WITH ORDINALITY AS u(p, ord)
ORDER BY u.ord";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifying_statements_differ_from_the_plain_ones_only_by_the_notification() {
        assert_eq!(
            INSERT_ONE_NOTIFY.replace(&format!(", {NOTIFY_IF_IDLE} AS n"), ""),
            INSERT_ONE
        );
        assert_eq!(
            INSERT_MANY_NOTIFY.replace(&format!(", {NOTIFY_IF_IDLE} AS notified"), ""),
            INSERT_MANY
        );
        assert_eq!(
            INSERT_MANY_UNCHECKED_NOTIFY.replace(&format!("\nWHERE {NOTIFY_IF_IDLE} >= 0"), ""),
            INSERT_MANY_UNCHECKED
        );
        assert!(INSERT_ONE.starts_with("INSERT INTO edupulse.outbox (id, name,"));
        for sql in [INSERT_ONE_IDLE, INSERT_ONE_HOLD] {
            assert!(sql.starts_with(INSERT_ONE));
            assert!(sql.contains("pg_try_advisory_xact_lock(1162104917, 0)"));
            assert!(sql.contains("FROM edupulse.relay_idle WHERE last_value = 1) AS wake"));
        }
        assert!(INSERT_ONE_HOLD.contains("pg_try_advisory_xact_lock_shared(1162104917, $12::int4)"));
    }
}
