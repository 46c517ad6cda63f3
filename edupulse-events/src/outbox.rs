//! Writing events into the outbox, and looking at it.

use crate::event::SubjectError;
use crate::message::{valid_traceparent, Outbound};
use crate::service::EventService;
use crate::DomainEvent;
use sqlx::{Connection, PgConnection, Row};
use std::time::Duration;
use time::OffsetDateTime;
use tracing::Instrument;
use uuid::Uuid;

/// The channel the emitting transaction notifies at commit.
pub(crate) const CHANNEL: &str = "edupulse_outbox";

/// An event on its way out, with the metadata it travels with.
///
/// `emit(event)` takes a bare event too; use this to set the correlation id, the
/// causation id or a W3C `traceparent`.
///
/// ```
/// # use edupulse_events::{DomainEvent, Outgoing};
/// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
/// # #[event(name = "quiz.graded")]
/// # struct QuizGraded { quiz_id: u64 }
/// let incoming_id = uuid::Uuid::now_v7();
/// let outgoing = Outgoing::new(QuizGraded { quiz_id: 1 })
///     .correlation_id(incoming_id)
///     .causation_id(incoming_id);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Outgoing<E> {
    event: E,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    traceparent: Option<String>,
}

impl<E: DomainEvent> Outgoing<E> {
    /// Wraps an event with no metadata: its correlation id will be its own id.
    pub fn new(event: E) -> Self {
        Outgoing {
            event,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
        }
    }

    /// The id of the conversation this event belongs to. Default: the event's own id.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// The id of the event that caused this one.
    pub fn causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// A W3C trace context (`00-{trace id}-{span id}-{flags}`), published as the
    /// `traceparent` header.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// The event.
    pub fn event(&self) -> &E {
        &self.event
    }
}

impl<E: DomainEvent> From<E> for Outgoing<E> {
    fn from(event: E) -> Self {
        Outgoing::new(event)
    }
}

/// What kind of failure an [`EmitError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmitErrorKind {
    /// A field's value cannot stand in the subject.
    Subject,
    /// The event does not serialize to JSON.
    Encode,
    /// The encoded event is larger than NATS or the stream accepts.
    TooLarge,
    /// The traceparent is not a W3C trace context.
    Traceparent,
    /// The outbox tables do not exist.
    NotMigrated,
    /// Postgres failed.
    Database,
}

/// An event could not be emitted; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmitError {
    /// A field's value cannot stand in the subject.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The event does not serialize to JSON.
    #[error("event `{event}` does not serialize to JSON: {source}; check its Serialize impl (maps need string keys)")]
    Encode {
        /// The event name.
        event: &'static str,
        /// What serde_json said.
        source: serde_json::Error,
    },
    /// The encoded event is larger than NATS or the stream accepts.
    #[error("event `{event}` is {size} bytes encoded (headers and JSON body), more than the {max} bytes NATS and the stream accept; make the event smaller (store large data elsewhere and put its key in the event) or raise max_payload")]
    TooLarge {
        /// The event name.
        event: &'static str,
        /// Its encoded size, in bytes.
        size: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The traceparent is not a W3C trace context.
    #[error("traceparent {0:?} is not a W3C trace context; pass one like 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01, or none")]
    Traceparent(String),
    /// The outbox tables do not exist yet.
    #[error(
        "the outbox table edupulse.outbox does not exist; call EventService::migrate() at start-up"
    )]
    NotMigrated,
    /// Postgres failed.
    #[error("writing to the outbox failed: {0}")]
    Database(#[source] sqlx::Error),
}

impl EmitError {
    /// What kind of failure this is.
    pub fn kind(&self) -> EmitErrorKind {
        match self {
            EmitError::Subject(_) => EmitErrorKind::Subject,
            EmitError::Encode { .. } => EmitErrorKind::Encode,
            EmitError::TooLarge { .. } => EmitErrorKind::TooLarge,
            EmitError::Traceparent(_) => EmitErrorKind::Traceparent,
            EmitError::NotMigrated => EmitErrorKind::NotMigrated,
            EmitError::Database(_) => EmitErrorKind::Database,
        }
    }
}

impl From<sqlx::Error> for EmitError {
    fn from(error: sqlx::Error) -> Self {
        if is_undefined_table(&error) {
            EmitError::NotMigrated
        } else {
            EmitError::Database(error)
        }
    }
}

pub(crate) fn is_undefined_table(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "42P01" || code == "3F000")
}

/// One event, checked and encoded, ready to insert.
struct Prepared {
    id: Uuid,
    subject: String,
    payload: String,
    correlation_id: Uuid,
    causation_id: Option<Uuid>,
    traceparent: Option<String>,
    occurred_at: OffsetDateTime,
    /// The room left for the JSON body, as Postgres will print it, after the headers.
    body_limit: i64,
    /// Whether the insert must check the printed size: `None` when it cannot exceed
    /// `body_limit` (see [`printed_fits`]), which spares Postgres printing the JSONB.
    check_limit: Option<i64>,
}

/// Whether compact JSON, as Postgres prints it as JSONB, surely fits in `limit` bytes.
/// Printing adds at most a space after each `,` and `:` (so at most doubles the text),
/// re-escapes strings to at most the same length, and writes numbers in full: only a
/// number with an exponent (`1e300`) can grow beyond that, so one makes the answer no.
fn printed_fits(json: &str, limit: usize) -> bool {
    if json.len().saturating_mul(2) > limit {
        return false;
    }
    let (mut in_string, mut escaped, mut previous) = (false, false, b' ');
    for &byte in json.as_bytes() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if (byte == b'e' || byte == b'E') && (previous.is_ascii_digit() || previous == b'.')
        {
            return false;
        }
        previous = byte;
    }
    true
}

/// How many events one `emit_all` statement writes at most; larger batches are split
/// into several statements of the same transaction.
const BATCH_CHUNK: usize = 5_000;

const INSERT_ONE: &str = "\
INSERT INTO edupulse.outbox
    (id, name, version, subject, payload, source, correlation_id, causation_id, traceparent, occurred_at)
SELECT $1, $2, $3, $4, x.p, $6, $7, $8, $9, $10
FROM (SELECT CAST($5::text AS jsonb) AS p) AS x
WHERE CASE WHEN $11::int8 IS NULL THEN true ELSE octet_length(x.p::text) <= $11 END
RETURNING seq";

const INSERT_ONE_NOTIFY: &str = "\
INSERT INTO edupulse.outbox
    (id, name, version, subject, payload, source, correlation_id, causation_id, traceparent, occurred_at)
SELECT $1, $2, $3, $4, x.p, $6, $7, $8, $9, $10
FROM (SELECT CAST($5::text AS jsonb) AS p,
             (SELECT count(pg_notify('edupulse_outbox', '')) FROM edupulse.relay_idle WHERE last_value = 1) AS n) AS x
WHERE CASE WHEN $11::int8 IS NULL THEN true ELSE octet_length(x.p::text) <= $11 END
RETURNING seq";

/// The batch insert; `$notify` is spliced into the size check, which runs once.
macro_rules! insert_many {
    ($notify:literal) => {
        concat!(
            "WITH input AS (
    SELECT u.id, u.subject, CAST(u.payload AS jsonb) AS p, u.correlation_id, u.causation_id,
           u.traceparent, u.occurred_at, u.body_limit, u.ord
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
                $7::timestamptz[], $8::int8[])
         WITH ORDINALITY AS u(id, subject, payload, correlation_id, causation_id, traceparent,
                              occurred_at, body_limit, ord)
), too_large AS (
    SELECT count(*) AS n", $notify, " FROM input
    WHERE CASE WHEN body_limit IS NULL THEN false ELSE octet_length(p::text) > body_limit END
)
INSERT INTO edupulse.outbox
    (id, name, version, subject, payload, source, correlation_id, causation_id, traceparent, occurred_at)
SELECT id, $9, $10, subject, p, $11, correlation_id, causation_id, traceparent, occurred_at
FROM input
WHERE (SELECT n FROM too_large) = 0
ORDER BY ord"
        )
    };
}

const INSERT_MANY: &str = insert_many!("");
const INSERT_MANY_NOTIFY: &str =
    insert_many!(", (SELECT count(pg_notify('edupulse_outbox', '')) FROM edupulse.relay_idle WHERE last_value = 1) AS notified");

/// The batch insert when no event needs Postgres' size check (the usual case): one
/// pass over the input, nothing materialised; `$notify` is a condition run once.
macro_rules! insert_many_unchecked {
    ($notify:literal) => {
        concat!(
            "INSERT INTO edupulse.outbox
    (id, name, version, subject, payload, source, correlation_id, causation_id, traceparent, occurred_at)
SELECT u.id, $8, $9, u.subject, CAST(u.payload AS jsonb), $10, u.correlation_id,
       u.causation_id, u.traceparent, u.occurred_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
            $7::timestamptz[])
     WITH ORDINALITY AS u(id, subject, payload, correlation_id, causation_id, traceparent,
                          occurred_at, ord)",
            $notify,
            "
ORDER BY u.ord"
        )
    };
}

const INSERT_MANY_UNCHECKED: &str = insert_many_unchecked!("");
const INSERT_MANY_UNCHECKED_NOTIFY: &str = insert_many_unchecked!(
    "
WHERE (SELECT count(pg_notify('edupulse_outbox', '')) FROM edupulse.relay_idle WHERE last_value = 1) >= 0"
);

const NOTIFY: &str = "SELECT pg_notify('edupulse_outbox', '')";

impl EventService {
    /// Emits one event in a transaction of its own; returns its id.
    ///
    /// # Errors
    /// [`EmitError`]; nothing is written.
    pub async fn emit<E: DomainEvent>(
        &self,
        event: impl Into<Outgoing<E>>,
    ) -> Result<Uuid, EmitError> {
        let mut tx = self.inner.pool.begin().await?;
        let id = self.emit_in(&mut tx, event).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Emits one event inside the caller's transaction (or on a connection): it is
    /// published if and only if that transaction commits. Returns the event's id.
    ///
    /// ```no_run
    /// # use edupulse_events::{DomainEvent, EventService};
    /// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
    /// # #[event(name = "lesson.published")]
    /// # struct LessonPublished { lesson_id: i64 }
    /// # async fn run(service: EventService) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = service.pool().begin().await?;
    /// sqlx::query("UPDATE lessons SET published = true WHERE id = $1")
    ///     .bind(7_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// service.emit_in(&mut tx, LessonPublished { lesson_id: 7 }).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`EmitError`]; nothing is written, and the caller's transaction stays usable
    /// unless Postgres itself failed.
    pub async fn emit_in<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        event: impl Into<Outgoing<E>>,
    ) -> Result<Uuid, EmitError> {
        let prepared = self.prepare(event.into())?;
        let span = tracing::debug_span!("edupulse.emit", event = E::NAME, id = %prepared.id);
        async {
            let sql = if self.inner.config.notify {
                INSERT_ONE_NOTIFY
            } else {
                INSERT_ONE
            };
            let row = sqlx::query(sql)
                .bind(prepared.id)
                .bind(E::NAME)
                .bind(version_i32::<E>())
                .bind(&prepared.subject)
                .bind(&prepared.payload)
                .bind(&self.inner.config.source)
                .bind(prepared.correlation_id)
                .bind(prepared.causation_id)
                .bind(prepared.traceparent.as_deref())
                .bind(prepared.occurred_at)
                .bind(prepared.check_limit)
                .fetch_optional(&mut *conn)
                .await?;
            match row {
                Some(_) => Ok(prepared.id),
                None => Err(self.too_large::<E>(conn, &[&prepared]).await),
            }
        }
        .instrument(span)
        .await
    }

    /// Emits a batch of events of one type in one transaction; returns their ids in
    /// order. All or none are written.
    ///
    /// # Errors
    /// [`EmitError`] for the first event that cannot be emitted; nothing is written.
    pub async fn emit_all<E, I>(&self, events: I) -> Result<Vec<Uuid>, EmitError>
    where
        E: DomainEvent,
        I: IntoIterator,
        I::Item: Into<Outgoing<E>>,
    {
        let mut tx = self.inner.pool.begin().await?;
        let ids = self.emit_all_in(&mut tx, events).await?;
        tx.commit().await?;
        Ok(ids)
    }

    /// Emits a batch of events of one type inside the caller's transaction, with one
    /// statement per 5,000 events; returns their ids in order. All or none are
    /// written: a batch of several statements runs under a savepoint (or, on a
    /// connection outside a transaction, in a transaction of its own).
    ///
    /// # Errors
    /// [`EmitError`] for the first event that cannot be emitted; nothing is written,
    /// and the caller's transaction stays usable unless Postgres itself failed.
    pub async fn emit_all_in<E, I>(
        &self,
        conn: &mut PgConnection,
        events: I,
    ) -> Result<Vec<Uuid>, EmitError>
    where
        E: DomainEvent,
        I: IntoIterator,
        I::Item: Into<Outgoing<E>>,
    {
        let prepared: Vec<Prepared> = events
            .into_iter()
            .map(|event| self.prepare(event.into()))
            .collect::<Result<_, _>>()?;
        let span =
            tracing::debug_span!("edupulse.emit_all", event = E::NAME, count = prepared.len());
        async {
            if prepared.is_empty() {
                return Ok(Vec::new());
            }
            if prepared.len() <= BATCH_CHUNK {
                return self.insert_chunk::<E>(conn, &prepared).await;
            }
            // Several statements: all or none. Inside a transaction a savepoint undoes
            // the written chunks when a later one fails (and leaves the caller's
            // transaction usable); on a connection outside one, a transaction does.
            match sqlx::raw_sql("SAVEPOINT edupulse_emit_all")
                .execute(&mut *conn)
                .await
            {
                Ok(_) => {
                    let written = self.insert_chunks::<E>(conn, &prepared).await;
                    let end = if written.is_ok() {
                        "RELEASE SAVEPOINT edupulse_emit_all"
                    } else {
                        "ROLLBACK TO SAVEPOINT edupulse_emit_all; \
                         RELEASE SAVEPOINT edupulse_emit_all"
                    };
                    let ended = sqlx::raw_sql(end).execute(&mut *conn).await;
                    let ids = written?;
                    ended?;
                    Ok(ids)
                }
                Err(error) if no_transaction(&error) => {
                    let mut tx = conn.begin().await?;
                    let ids = self.insert_chunks::<E>(&mut tx, &prepared).await?;
                    tx.commit().await?;
                    Ok(ids)
                }
                Err(error) => Err(error.into()),
            }
        }
        .instrument(span)
        .await
    }

    async fn insert_chunks<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        prepared: &[Prepared],
    ) -> Result<Vec<Uuid>, EmitError> {
        let mut ids = Vec::with_capacity(prepared.len());
        for chunk in prepared.chunks(BATCH_CHUNK) {
            ids.extend(self.insert_chunk::<E>(conn, chunk).await?);
        }
        Ok(ids)
    }

    /// Writes up to `BATCH_CHUNK` events in one statement: all, or none if one is too
    /// large.
    async fn insert_chunk<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        chunk: &[Prepared],
    ) -> Result<Vec<Uuid>, EmitError> {
        let notify = self.inner.config.notify;
        let checked = chunk.iter().any(|p| p.check_limit.is_some());
        let sql = match (checked, notify) {
            (true, true) => INSERT_MANY_NOTIFY,
            (true, false) => INSERT_MANY,
            (false, true) => INSERT_MANY_UNCHECKED_NOTIFY,
            (false, false) => INSERT_MANY_UNCHECKED,
        };
        let query = sqlx::query(sql)
            .bind(chunk.iter().map(|p| p.id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|p| p.subject.as_str()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|p| p.payload.as_str()).collect::<Vec<_>>())
            .bind(chunk.iter().map(|p| p.correlation_id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|p| p.causation_id).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|p| p.traceparent.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|p| p.occurred_at).collect::<Vec<_>>());
        let query = if checked {
            query.bind(chunk.iter().map(|p| p.check_limit).collect::<Vec<_>>())
        } else {
            query
        };
        let inserted = query
            .bind(E::NAME)
            .bind(version_i32::<E>())
            .bind(&self.inner.config.source)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if usize::try_from(inserted).ok() != Some(chunk.len()) {
            // Only the size check can drop rows; the statement then writes none.
            let chunk: Vec<&Prepared> = chunk.iter().collect();
            return Err(self.too_large::<E>(conn, &chunk).await);
        }
        Ok(chunk.iter().map(|p| p.id).collect())
    }

    fn prepare<E: DomainEvent>(&self, outgoing: Outgoing<E>) -> Result<Prepared, EmitError> {
        let subject = outgoing.event.subject()?;
        let payload =
            serde_json::to_string(&outgoing.event).map_err(|source| EmitError::Encode {
                event: E::NAME,
                source,
            })?;
        if has_escaped_nul(&payload) {
            return Err(EmitError::Encode {
                event: E::NAME,
                source: serde::ser::Error::custom(
                    "a string contains a NUL character (\\u0000), which Postgres JSONB cannot store; remove it",
                ),
            });
        }
        if let Some(traceparent) = &outgoing.traceparent {
            if !valid_traceparent(traceparent) {
                return Err(EmitError::Traceparent(
                    traceparent.chars().take(80).collect(),
                ));
            }
        }
        let id = Uuid::now_v7();
        let occurred_at = OffsetDateTime::now_utc();
        // Inside a consumer's handler, a new event is caused by the one being handled
        // and joins its conversation, unless the caller said otherwise.
        let cause = crate::consumer::current_cause();
        let causation_id = outgoing.causation_id.or(cause.map(|c| c.event_id));
        let correlation_id = outgoing
            .correlation_id
            .or(cause.map(|c| c.correlation_id))
            .unwrap_or(id);
        let envelope = Outbound {
            id,
            name: E::NAME,
            version: version_i32::<E>(),
            subject: &subject,
            source: &self.inner.config.source,
            occurred_at,
            correlation_id: Some(correlation_id),
            causation_id,
            traceparent: outgoing.traceparent.as_deref(),
        };
        let headers = envelope.headers_wire_len();
        let max = self.inner.max_message;
        if headers + payload.len() > max {
            return Err(EmitError::TooLarge {
                event: E::NAME,
                size: headers + payload.len(),
                max,
            });
        }
        let body_limit = i64::try_from(max - headers).unwrap_or(i64::MAX);
        Ok(Prepared {
            check_limit: (!printed_fits(&payload, max - headers)).then_some(body_limit),
            id,
            subject,
            payload,
            correlation_id,
            causation_id,
            traceparent: outgoing.traceparent,
            occurred_at,
            body_limit,
        })
    }

    /// The error for the first of `candidates` whose JSON body, as Postgres prints
    /// JSONB, does not fit beside its headers (the insert's size check refused it).
    async fn too_large<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        candidates: &[&Prepared],
    ) -> EmitError {
        let max = self.inner.max_message;
        let sizes: Result<Vec<i64>, sqlx::Error> = sqlx::query_scalar(JSONB_SIZES)
            .bind(
                candidates
                    .iter()
                    .map(|p| p.payload.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *conn)
            .await;
        let headers = |p: &Prepared| max.saturating_sub(usize::try_from(p.body_limit).unwrap_or(0));
        let found = sizes.ok().and_then(|sizes| {
            candidates
                .iter()
                .zip(sizes)
                .find(|(p, size)| *size > p.body_limit)
                .map(|(p, size)| headers(p) + usize::try_from(size).unwrap_or(usize::MAX))
        });
        let size = found.unwrap_or_else(|| {
            // Could not ask: the largest compact body, plus at least the one byte
            // Postgres' printing adds (spaces after `:` and `,`).
            candidates
                .iter()
                .map(|p| headers(p) + p.payload.len())
                .max()
                .unwrap_or(0)
                .max(max + 1)
        });
        EmitError::TooLarge {
            event: E::NAME,
            size,
            max,
        }
    }
}

/// The printed size of each JSON text as JSONB, in order.
const JSONB_SIZES: &str = "\
SELECT octet_length(CAST(u.p AS jsonb)::text)::int8
FROM unnest($1::text[]) WITH ORDINALITY AS u(p, ord)
ORDER BY u.ord";

/// Whether `error` says the connection is not in a transaction block.
fn no_transaction(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "25P01")
}

/// Whether compact JSON holds an escaped NUL (`\u0000` not itself escaped).
fn has_escaped_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    json.match_indices("\\u0000").any(|(at, _)| {
        let backslashes = bytes[..at]
            .iter()
            .rev()
            .take_while(|b| **b == b'\\')
            .count();
        backslashes % 2 == 0
    })
}

fn version_i32<E: DomainEvent>() -> i32 {
    // The derive refuses versions above i32::MAX; only a hand-written impl gets here.
    i32::try_from(E::VERSION).unwrap_or(i32::MAX)
}

/// The state of the outbox, as [`EventService::outbox_status`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Committed events not yet published.
    pub pending: i64,
    /// Events JetStream rejected for good; see [`EventService::requeue_dead`].
    pub dead: i64,
    /// How long the oldest pending event has waited; zero when none is pending.
    pub oldest_pending_age: Duration,
    /// The sequence number of the oldest pending event.
    pub oldest_pending_seq: Option<i64>,
}

/// Which dead events [`EventService::requeue_dead`] puts back in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Every dead event.
    All,
    /// The dead events with these ids (others are left alone).
    Ids(Vec<Uuid>),
}

/// A dead event, as [`EventService::dead_events`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadEvent {
    /// The event id.
    pub id: Uuid,
    /// The event name.
    pub name: String,
    /// The relative subject.
    pub subject: String,
    /// How many publishes were tried.
    pub attempts: i32,
    /// Why JetStream rejected it.
    pub last_error: Option<String>,
}

impl EventService {
    /// Counts pending and dead events and measures the oldest pending one.
    ///
    /// # Errors
    /// The Postgres error, if the query failed.
    pub async fn outbox_status(&self) -> Result<OutboxStatus, sqlx::Error> {
        let row = sqlx::query(
            "SELECT
                (SELECT count(*) FROM edupulse.pending_events) AS pending,
                (SELECT count(*) FROM edupulse.outbox WHERE status = 'dead') AS dead,
                oldest.seq AS oldest_seq,
                extract(epoch FROM (clock_timestamp() - oldest.occurred_at))::float8 AS age
             FROM (SELECT 1) AS one
             LEFT JOIN LATERAL (
                SELECT seq, occurred_at FROM edupulse.pending_events ORDER BY seq LIMIT 1
             ) AS oldest ON true",
        )
        .fetch_one(&self.inner.pool)
        .await?;
        let age: Option<f64> = row.try_get("age")?;
        Ok(OutboxStatus {
            pending: row.try_get("pending")?,
            dead: row.try_get("dead")?,
            oldest_pending_seq: row.try_get("oldest_seq")?,
            oldest_pending_age: Duration::from_secs_f64(age.unwrap_or(0.0).max(0.0)),
        })
    }

    /// Lists dead events, oldest first, at most `limit`.
    ///
    /// # Errors
    /// The Postgres error, if the query failed.
    pub async fn dead_events(&self, limit: i64) -> Result<Vec<DeadEvent>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, name, subject, attempts, last_error FROM edupulse.outbox
             WHERE status = 'dead' ORDER BY seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadEvent {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    subject: row.try_get("subject")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Puts dead events back in line for the relay; returns how many.
    ///
    /// # Errors
    /// The Postgres error, if the update failed.
    pub async fn requeue_dead(&self, which: Requeue) -> Result<u64, sqlx::Error> {
        // Each gets a new sequence number, in the order they had: the relay's mark
        // (`published_through`) may be past their old one, and they are published after
        // everything emitted so far anyway.
        let ids = match which {
            Requeue::All => None,
            Requeue::Ids(ids) => Some(ids),
        };
        let mut tx = self.inner.pool.begin().await?;
        let result = sqlx::query(
            "WITH dead AS (
                SELECT seq FROM edupulse.outbox
                WHERE status = 'dead' AND ($1::uuid[] IS NULL OR id = ANY($1))
                ORDER BY seq
                FOR UPDATE
             ),
             renumbered AS (
                SELECT seq AS old, nextval('edupulse.outbox_seq_seq') AS new
                FROM (SELECT seq FROM dead ORDER BY seq) AS ordered
             )
             UPDATE edupulse.outbox AS o
             SET seq = r.new, status = 'pending', attempts = 0, next_attempt_at = now()
             FROM renumbered AS r
             WHERE o.seq = r.old",
        )
        .bind(ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query(NOTIFY).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(result.rows_affected())
    }

    /// Where one event stands in the outbox: `None` if it is not there (never
    /// committed, or published and pruned after the retention).
    ///
    /// # Errors
    /// The Postgres error, if the query failed.
    pub async fn event_state(&self, id: Uuid) -> Result<Option<EventState>, sqlx::Error> {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT CASE WHEN o.status = 'pending' AND o.seq <= p.published_through
                         THEN 'published' ELSE o.status END
             FROM edupulse.outbox AS o, edupulse.relay_progress AS p
             WHERE o.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.inner.pool)
        .await?;
        Ok(state.map(|state| match state.as_str() {
            "published" => EventState::Published,
            "dead" => EventState::Dead,
            _ => EventState::Pending,
        }))
    }
}

/// Where an event stands in the outbox, as [`EventService::event_state`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventState {
    /// Committed, not yet published.
    Pending,
    /// In the stream, acknowledged by JetStream.
    Published,
    /// JetStream rejected it for good; see [`EventService::requeue_dead`].
    Dead,
}

#[cfg(test)]
mod tests {
    use super::{has_escaped_nul, printed_fits};

    #[test]
    fn printed_size_is_checked_only_where_it_could_exceed_the_limit() {
        // Plain JSON well under half the limit fits whatever Postgres' spacing.
        assert!(printed_fits(
            r#"{"title":"true false e1 2e3","n":[1,2.5,-3]}"#,
            1000
        ));
        assert!(printed_fits(
            r#"{"s":"a\"1e9\"b","t":true,"f":false}"#,
            1000
        ));
        // Over half the limit: spaces after `,` and `:` could push it over.
        assert!(!printed_fits(&"[1,".repeat(200), 1000));
        // A number with an exponent prints in full: 1e300 is 301 digits.
        assert!(!printed_fits(r#"{"x":1e300}"#, 1000));
        assert!(!printed_fits(r#"[1.5E-7]"#, 1000));
        assert!(!printed_fits(
            &serde_json::to_string(&1e300_f64).unwrap(),
            1000
        ));
    }

    #[test]
    fn escaped_nul_is_found_and_escaped_backslashes_are_not() {
        assert!(has_escaped_nul(&serde_json::to_string("a\u{0}b").unwrap()));
        assert!(!has_escaped_nul(
            &serde_json::to_string("a\\u0000b").unwrap()
        ));
        assert!(has_escaped_nul(&serde_json::to_string("\\\u{0}").unwrap()));
        assert!(!has_escaped_nul(r#"{"a":"plain"}"#));
    }
}
