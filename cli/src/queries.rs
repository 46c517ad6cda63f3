//! The CLI's own read-only SQL against the tables the migrations define: runtime-checked
//! queries with binds. Timestamps come back as RFC 3339 text (UTC), ages as seconds.

use crate::error::CliError;
use edupulse_events::sqlx::{self, postgres::PgPool, Row};
use edupulse_events::Uuid;
use serde::Serialize;

/// The relay's advisory lock key, split as `pg_locks` shows a bigint key: high and low
/// 32 bits.
const LEADER_LOCK: i64 = edupulse_events::RELAY_LEADER_LOCK;

/// A timestamp as RFC 3339 text, UTC.
macro_rules! rfc3339 {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

/// The session holding the relay's leader lock.
#[derive(Debug, Clone, Serialize)]
pub struct Leader {
    /// Its backend's process id.
    pub pid: i32,
    /// The client's address (`local` for a Unix socket); `None` when this role may
    /// not see it (it needs `pg_read_all_stats`, e.g. through `pg_monitor`).
    pub host: Option<String>,
    /// Its `application_name` (the service's source).
    pub application_name: String,
    /// When its session started (it has led at most since then); `None` when this
    /// role may not see it.
    pub since: Option<String>,
}

/// Who leads the relay, if anyone.
pub async fn leader(pool: &PgPool) -> Result<Option<Leader>, CliError> {
    let sql = concat!(
        "SELECT a.pid,
                CASE WHEN a.client_port = -1 THEN 'local' ELSE host(a.client_addr) END AS host,
                coalesce(a.application_name, '') AS application_name, ",
        rfc3339!("a.backend_start"),
        " AS since
         FROM pg_catalog.pg_locks AS l
         JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_catalog.pg_database
                             WHERE datname = pg_catalog.current_database())
           AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1
         LIMIT 1"
    );
    let row = sqlx::query(sql)
        .bind(LEADER_LOCK >> 32)
        .bind(LEADER_LOCK & 0xffff_ffff)
        .fetch_optional(pool)
        .await?;
    row.map(|row| {
        Ok(Leader {
            pid: row.try_get("pid")?,
            host: row.try_get("host")?,
            application_name: row.try_get("application_name")?,
            since: row.try_get("since")?,
        })
    })
    .transpose()
    .map_err(|e: sqlx::Error| e.into())
}

/// The outbox at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct Outbox {
    /// Pending events (above the mark).
    pub pending: i64,
    /// Dead events.
    pub dead: i64,
    /// The oldest pending event's sequence.
    pub oldest_pending_seq: Option<i64>,
    /// Its age in seconds.
    pub oldest_pending_age_secs: Option<f64>,
    /// How often publishing it was tried and failed.
    pub oldest_pending_attempts: Option<i32>,
    /// Why its last publish failed.
    pub oldest_pending_error: Option<String>,
    /// The relay's mark: every pending event at or below it is published.
    pub published_through: i64,
    /// When the mark last moved.
    pub mark_updated_at: Option<String>,
}

/// Counts and the oldest pending event, from the `pending_events` view.
pub async fn outbox(pool: &PgPool) -> Result<Outbox, CliError> {
    let sql = concat!(
        "SELECT
            (SELECT count(*) FROM edupulse.pending_events) AS pending,
            (SELECT count(*) FROM edupulse.outbox WHERE status = 'dead') AS dead,
            oldest.seq AS oldest_seq,
            extract(epoch FROM (clock_timestamp() - oldest.occurred_at))::float8 AS age,
            oldest.attempts, oldest.last_error,
            p.published_through, ",
        rfc3339!("p.updated_at"),
        " AS updated_at
         FROM edupulse.relay_progress AS p
         LEFT JOIN LATERAL (
            SELECT seq, occurred_at, attempts, last_error
            FROM edupulse.pending_events ORDER BY seq LIMIT 1
         ) AS oldest ON true"
    );
    let row = sqlx::query(sql).fetch_one(pool).await?;
    let read = || -> Result<Outbox, sqlx::Error> {
        Ok(Outbox {
            pending: row.try_get("pending")?,
            dead: row.try_get("dead")?,
            oldest_pending_seq: row.try_get("oldest_seq")?,
            oldest_pending_age_secs: row.try_get::<Option<f64>, _>("age")?.map(|a| a.max(0.0)),
            oldest_pending_attempts: row.try_get("attempts")?,
            oldest_pending_error: row.try_get("last_error")?,
            published_through: row.try_get("published_through")?,
            mark_updated_at: row.try_get("updated_at")?,
        })
    };
    Ok(read()?)
}

/// A transaction that has written to the outbox and not ended: it may hold a sequence
/// number below committed events, which the relay waits for to publish in order.
#[derive(Debug, Clone, Serialize)]
pub struct Writer {
    /// Its backend's process id.
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// How long its transaction has been open, in seconds.
    pub open_secs: f64,
    /// Its state (`idle in transaction`, `active`).
    pub state: String,
}

/// The oldest open transaction holding a write lock on the outbox, other than
/// `except` (the leader, which writes marks) and this session.
pub async fn open_writer(pool: &PgPool, except: Option<i32>) -> Result<Option<Writer>, CliError> {
    let sql = "SELECT a.pid, coalesce(a.application_name, '') AS application_name,
                      extract(epoch FROM (clock_timestamp() - a.xact_start))::float8 AS open_secs,
                      coalesce(a.state, '') AS state
               FROM pg_catalog.pg_locks AS l
               JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
               WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'RowExclusiveLock'
                 AND l.relation = 'edupulse.outbox'::regclass
                 AND a.pid <> pg_catalog.pg_backend_pid()
                 AND ($1::int IS NULL OR a.pid <> $1)
                 AND a.xact_start IS NOT NULL
               ORDER BY a.xact_start LIMIT 1";
    let row = sqlx::query(sql).bind(except).fetch_optional(pool).await?;
    row.map(|row| {
        Ok(Writer {
            pid: row.try_get("pid")?,
            application_name: row.try_get("application_name")?,
            open_secs: row.try_get::<Option<f64>, _>("open_secs")?.unwrap_or(0.0),
            state: row.try_get("state")?,
        })
    })
    .transpose()
    .map_err(|e: sqlx::Error| e.into())
}

/// One event's outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    /// Its sequence number.
    pub seq: i64,
    /// `pending`, `published` or `dead` (a pending row at or below the mark is
    /// published).
    pub state: String,
    /// The event name.
    pub name: String,
    /// The event version.
    pub version: i32,
    /// The relative subject.
    pub subject: String,
    /// When it was emitted.
    pub occurred_at: Option<String>,
    /// Publish attempts that failed.
    pub attempts: i32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When the relay tries it again, if it failed.
    pub next_attempt_at: Option<String>,
    /// When it was marked published, when it was marked one by one.
    pub published_at: Option<String>,
    /// Seconds between emitting and publishing, when both are known.
    pub outbox_secs: Option<f64>,
    /// Pending events before it.
    pub pending_before: i64,
    /// When it was emitted, in seconds since the Unix epoch.
    #[serde(skip)]
    pub occurred_epoch: f64,
}

/// One event's row, if the outbox holds it.
pub async fn event(pool: &PgPool, id: Uuid) -> Result<Option<EventRow>, CliError> {
    let sql = concat!(
        "SELECT o.seq,
                CASE WHEN o.status = 'dead' THEN 'dead'
                     WHEN o.status = 'published' OR o.seq <= p.published_through THEN 'published'
                     ELSE 'pending' END AS state,
                o.name, o.version, o.subject, ",
        rfc3339!("o.occurred_at"),
        " AS occurred_at, o.attempts, o.last_error, ",
        rfc3339!("o.next_attempt_at"),
        " AS next_attempt_at, ",
        rfc3339!("o.published_at"),
        " AS published_at,
                extract(epoch FROM (o.published_at - o.occurred_at))::float8 AS outbox_secs,
                (SELECT count(*) FROM edupulse.pending_events AS e WHERE e.seq < o.seq)
                    AS pending_before,
                extract(epoch FROM o.occurred_at)::float8 AS occurred_epoch
         FROM edupulse.outbox AS o, edupulse.relay_progress AS p
         WHERE o.id = $1"
    );
    let row = sqlx::query(sql).bind(id).fetch_optional(pool).await?;
    row.map(|row| {
        Ok(EventRow {
            seq: row.try_get("seq")?,
            state: row.try_get("state")?,
            name: row.try_get("name")?,
            version: row.try_get("version")?,
            subject: row.try_get("subject")?,
            occurred_at: row.try_get("occurred_at")?,
            attempts: row.try_get("attempts")?,
            last_error: row.try_get("last_error")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            published_at: row.try_get("published_at")?,
            outbox_secs: row.try_get("outbox_secs")?,
            pending_before: row.try_get("pending_before")?,
            occurred_epoch: row.try_get("occurred_epoch")?,
        })
    })
    .transpose()
    .map_err(|e: sqlx::Error| e.into())
}

/// The groups whose inbox holds the event, and when they handled it.
pub async fn inbox_of(pool: &PgPool, id: Uuid) -> Result<Vec<(String, Option<String>)>, CliError> {
    let sql = concat!(
        "SELECT consumer_group, ",
        rfc3339!("handled_at"),
        " AS handled_at FROM edupulse.inbox WHERE event_id = $1 ORDER BY consumer_group"
    );
    let rows = sqlx::query(sql).bind(id).fetch_all(pool).await?;
    rows.iter()
        .map(|row| Ok((row.try_get("consumer_group")?, row.try_get("handled_at")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// A dead letter, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRow {
    /// The record's id.
    pub id: i64,
    /// The consumer group.
    pub group: String,
    /// Why (handler_failed, undecodable, ...).
    pub reason: String,
    /// What went wrong.
    pub error: String,
    /// The event id, when the message had one.
    pub event_id: Option<Uuid>,
    /// The event name, when the message had one.
    pub event_name: Option<String>,
    /// The full subject.
    pub subject: String,
    /// The message's stream sequence.
    pub stream_sequence: i64,
    /// How many deliveries it had.
    pub deliveries: i32,
    /// When it was recorded.
    pub created_at: Option<String>,
    /// How many replays were tried.
    pub replays: i32,
    /// When a replay went through.
    pub replayed_at: Option<String>,
}

/// Dead letters of `group` (or, with `event`, of every group for that event), oldest
/// first, at most `limit`, of `reason` only when given.
pub async fn dead_letters(
    pool: &PgPool,
    group: Option<&str>,
    event: Option<Uuid>,
    reason: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, CliError> {
    let sql = concat!(
        "SELECT id, consumer_group, reason, error, event_id, event_name, subject,
                stream_sequence, deliveries, replays, ",
        rfc3339!("created_at"),
        " AS created_at, ",
        rfc3339!("replayed_at"),
        " AS replayed_at
         FROM edupulse.dead_letters
         WHERE ($1::text IS NULL OR consumer_group = $1)
           AND ($2::uuid IS NULL OR event_id = $2)
           AND ($3::text IS NULL OR reason = $3)
         ORDER BY id LIMIT $4"
    );
    let rows = sqlx::query(sql)
        .bind(group)
        .bind(event)
        .bind(reason)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(DeadLetterRow {
                id: row.try_get("id")?,
                group: row.try_get("consumer_group")?,
                reason: row.try_get("reason")?,
                error: row.try_get("error")?,
                event_id: row.try_get("event_id")?,
                event_name: row.try_get("event_name")?,
                subject: row.try_get("subject")?,
                stream_sequence: row.try_get("stream_sequence")?,
                deliveries: row.try_get("deliveries")?,
                created_at: row.try_get("created_at")?,
                replays: row.try_get("replays")?,
                replayed_at: row.try_get("replayed_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// How many dead letters each group has.
pub async fn dead_letter_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, CliError> {
    let rows = sqlx::query(
        "SELECT consumer_group, count(*) AS n FROM edupulse.dead_letters
         GROUP BY consumer_group ORDER BY consumer_group",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("consumer_group")?, row.try_get("n")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// An event the outbox holds as published.
#[derive(Debug, Clone)]
pub struct Published {
    /// The event id.
    pub id: Uuid,
    /// The event name.
    pub name: String,
}

/// The events emitted in the last `since_secs` seconds that the outbox holds as
/// published, in sequence order.
pub async fn published_since(pool: &PgPool, since_secs: f64) -> Result<Vec<Published>, CliError> {
    let rows = sqlx::query(
        "SELECT o.id, o.name
         FROM edupulse.outbox AS o, edupulse.relay_progress AS p
         WHERE (o.status = 'published' OR (o.status = 'pending' AND o.seq <= p.published_through))
           AND o.occurred_at >= pg_catalog.now() - pg_catalog.make_interval(secs => $1)
         ORDER BY o.seq",
    )
    .bind(since_secs)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Published {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// Pending events emitted in the last `since_secs` seconds and more than
/// `stuck_secs` ago, in sequence order.
pub async fn stuck(pool: &PgPool, since_secs: f64, stuck_secs: f64) -> Result<Vec<Uuid>, CliError> {
    let ids = sqlx::query_scalar(
        "SELECT id FROM edupulse.pending_events
         WHERE occurred_at >= pg_catalog.now() - pg_catalog.make_interval(secs => $1)
           AND occurred_at < pg_catalog.now() - pg_catalog.make_interval(secs => $2)
         ORDER BY seq",
    )
    .bind(since_secs)
    .bind(stuck_secs)
    .fetch_all(pool)
    .await?;
    Ok(ids)
}

/// For the events emitted in the last `since_secs` seconds: which group has which in
/// its inbox, as (group, event id).
pub async fn inbox_since(pool: &PgPool, since_secs: f64) -> Result<Vec<(String, Uuid)>, CliError> {
    let rows = sqlx::query(
        "SELECT i.consumer_group, i.event_id
         FROM edupulse.inbox AS i JOIN edupulse.outbox AS o ON o.id = i.event_id
         WHERE o.occurred_at >= pg_catalog.now() - pg_catalog.make_interval(secs => $1)",
    )
    .bind(since_secs)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("consumer_group")?, row.try_get("event_id")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// Which group dead-lettered which of `ids`, as (group, event id).
pub async fn dead_lettered(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<(String, Uuid)>, CliError> {
    let rows = sqlx::query(
        "SELECT DISTINCT consumer_group, event_id FROM edupulse.dead_letters
         WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("consumer_group")?, row.try_get("event_id")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}
