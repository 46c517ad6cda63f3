//! Writing events into the outbox, and looking at it.
//!
//! [`Emitter::emit`] and its siblings (also on [`EventService`](crate::EventService))
//! write events beside the caller's business rows, with Postgres alone ([`emitter`]); [`prepare`] checks and encodes each event first, [`sql`] holds the statements,
//! and [`admin`] answers what is pending or dead and puts dead events back in line.

mod admin;
mod emitter;
mod prepare;
mod sql;
mod wake;

pub use admin::{DeadEvent, EventState, OutboxError, OutboxStatus, Requeue};
pub use emitter::{Emitter, DEFAULT_MAX_MESSAGE_SIZE};

use crate::event::SubjectError;
use crate::support::pg::{is_no_transaction, is_undefined_table};
use crate::DomainEvent;
use prepare::{version_i32, Prepared};
use sql::*;
use sqlx::{Connection, PgConnection};
use tracing::Instrument;
use uuid::Uuid;

/// How an emit wakes an idle relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A notification in the transaction, sent by its commit (`emit_all_in`: one
    /// commit per batch of events, so the notify lock costs little per event).
    InTransaction,
    /// After the emitter's own transaction commits, by its waker.
    After,
    /// By the waker, once the caller's transaction ends: the statement takes a lock
    /// that the transaction holds until then (see `wake`).
    AtEnd,
}

/// The key of the advisory lock an `emit_in` holds for the waker: random bits of the
/// event's id (a UUIDv7 ends with random bits), so that transactions open at the same
/// time hold different keys.
fn hold_key(id: Uuid) -> i32 {
    let bytes = id.as_bytes();
    match i32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) {
        // 0 is the notifier's key.
        0 => 1,
        key => key,
    }
}

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
    pub(crate) correlation_id: Option<Uuid>,
    pub(crate) causation_id: Option<Uuid>,
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
    /// The event type's name or subject breaks the rules the derive checks (a
    /// hand-written `DomainEvent` impl).
    Definition,
    /// The event does not serialize to JSON.
    Encode,
    /// The encoded event is larger than NATS or the stream accepts.
    TooLarge,
    /// The traceparent is not a W3C trace context.
    Traceparent,
    /// The outbox tables do not exist.
    NotMigrated,
    /// A `Received` that no consumer delivered was asked to emit.
    Unbound,
    /// Postgres failed.
    Database,
}

/// An event could not be emitted; nothing was written.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum EmitError {
    /// A field's value cannot stand in the subject.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The event type's name or subject breaks the rules the derive checks; only a
    /// hand-written `DomainEvent` impl gets here.
    #[error("event type `{event}` cannot be emitted: {reason}; derive DomainEvent instead of implementing it by hand, or follow the derive's rules (README: Event definitions)")]
    Definition {
        /// The event name, as the type gives it.
        event: &'static str,
        /// What is wrong.
        reason: String,
    },
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
    /// The full subject is longer than NATS can carry in one command line.
    #[error("event `{event}` has a subject of {len} bytes with the prefix, more than the {max} NATS carries; use shorter subject tokens (placeholder values) or a shorter prefix")]
    SubjectTooLong {
        /// The event name.
        event: &'static str,
        /// The full subject's length, in bytes.
        len: usize,
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
    /// [`Received::emit_in`](crate::Received::emit_in) on a `Received` that no consumer
    /// delivered.
    #[error("this Received was not delivered by a consumer, so it has no emitter; in a test build it with testing::received_via(&emitter, event), or emit through an Emitter")]
    Unbound,
    /// Postgres failed.
    #[error("writing to the outbox failed: {0}")]
    Database(#[source] sqlx::Error),
}

impl EmitError {
    /// What kind of failure this is.
    pub fn kind(&self) -> EmitErrorKind {
        match self {
            EmitError::Subject(_) => EmitErrorKind::Subject,
            EmitError::Definition { .. } => EmitErrorKind::Definition,
            EmitError::Encode { .. } => EmitErrorKind::Encode,
            EmitError::TooLarge { .. } => EmitErrorKind::TooLarge,
            EmitError::SubjectTooLong { .. } => EmitErrorKind::Subject,
            EmitError::Traceparent(_) => EmitErrorKind::Traceparent,
            EmitError::NotMigrated => EmitErrorKind::NotMigrated,
            EmitError::Unbound => EmitErrorKind::Unbound,
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

impl Emitter {
    /// Emits one event in a transaction of its own; returns its id.
    ///
    /// # Errors
    /// [`EmitError`]; nothing is written.
    pub async fn emit<E: DomainEvent>(
        &self,
        event: impl Into<Outgoing<E>>,
    ) -> Result<Uuid, EmitError> {
        // One statement, its own transaction. While the relay is idle it notifies in it
        // if no other writer is notifying; else the waker wakes the relay after the
        // commit, from outside it (see `wake`).
        let mut conn = self.inner.pool.acquire().await?;
        let (id, ask) = self.write_one(&mut conn, event.into(), Wake::After).await?;
        if ask {
            self.inner.waker.wake();
        }
        Ok(id)
    }

    /// Emits one event inside the caller's transaction (or on a connection): it is
    /// published if and only if that transaction commits. Returns the event's id.
    ///
    /// ```no_run
    /// # use edupulse_events::{DomainEvent, Emitter};
    /// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
    /// # #[event(name = "lesson.published")]
    /// # struct LessonPublished { lesson_id: i64 }
    /// # async fn run(emitter: Emitter) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = emitter.pool().begin().await?;
    /// sqlx::query("UPDATE lessons SET published = true WHERE id = $1")
    ///     .bind(7_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// emitter.emit_in(&mut tx, LessonPublished { lesson_id: 7 }).await?;
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
        // While the relay is idle, one writer at a time notifies in its transaction;
        // for the others the waker wakes the relay once their transaction ends (see
        // `wake`): notifying commits never queue behind each other.
        let (id, held) = self.write_one(conn, event.into(), Wake::AtEnd).await?;
        if held {
            self.inner.waker.wake_at_end(hold_key(id));
        }
        Ok(id)
    }

    /// Writes one event on `conn`; returns its id and whether the waker is to be asked
    /// (the relay said it was idle and the statement did not notify in the transaction;
    /// woken `AtEnd`, it took the lock the waker waits for).
    async fn write_one<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        event: Outgoing<E>,
        wake: Wake,
    ) -> Result<(Uuid, bool), EmitError> {
        let prepared = self.prepare(event)?;
        let span = tracing::debug_span!(
            "edupulse.emit",
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.destination.name = %format_args!("{}.{}", self.inner.config.subject_prefix, prepared.subject),
            messaging.message.id = %prepared.id,
            event = E::NAME,
            id = %prepared.id
        );
        async {
            let notify = self.inner.config.notify;
            let sql = match (notify, wake) {
                (false, _) => INSERT_ONE,
                (true, Wake::InTransaction) => INSERT_ONE_NOTIFY,
                (true, Wake::After) => INSERT_ONE_IDLE,
                (true, Wake::AtEnd) => INSERT_ONE_HOLD,
            };
            let query = sqlx::query(sql)
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
                .bind(prepared.check_limit);
            let query = if sql == INSERT_ONE_HOLD {
                query.bind(hold_key(prepared.id))
            } else {
                query
            };
            let row = query.fetch_optional(&mut *conn).await?;
            match row {
                Some(row) => {
                    #[cfg(feature = "testing")]
                    prepared.record::<E>();
                    let ask = match (notify, wake) {
                        (true, Wake::After | Wake::AtEnd) => {
                            use sqlx::Row;
                            row.try_get::<Option<bool>, _>("wake")?.unwrap_or(false)
                        }
                        _ => false,
                    };
                    Ok((prepared.id, ask))
                }
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
        let ids = self.write_all(&mut tx, events, Wake::After).await?;
        tx.commit().await?;
        if self.inner.config.notify && !ids.is_empty() {
            // The waker looks at the idle flag itself.
            self.inner.waker.wake();
        }
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
        self.write_all(conn, events, Wake::InTransaction).await
    }

    /// Writes a batch of events on `conn`, notifying the relay in the transaction
    /// unless it is woken `After`.
    async fn write_all<E, I>(
        &self,
        conn: &mut PgConnection,
        events: I,
        wake: Wake,
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
        let span = tracing::debug_span!(
            "edupulse.emit_all",
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.batch.message_count = prepared.len(),
            event = E::NAME,
            count = prepared.len()
        );
        async {
            if prepared.is_empty() {
                return Ok(Vec::new());
            }
            if prepared.len() <= BATCH_CHUNK {
                return self.insert_chunk::<E>(conn, &prepared, wake).await;
            }
            // Several statements: all or none. Inside a transaction a savepoint undoes
            // the written chunks when a later one fails (and leaves the caller's
            // transaction usable); on a connection outside one, a transaction does.
            match sqlx::raw_sql("SAVEPOINT edupulse_emit_all")
                .execute(&mut *conn)
                .await
            {
                Ok(_) => {
                    let written = self.insert_chunks::<E>(conn, &prepared, wake).await;
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
                Err(error) if is_no_transaction(&error) => {
                    let mut tx = conn.begin().await?;
                    let ids = self.insert_chunks::<E>(&mut tx, &prepared, wake).await?;
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
        wake: Wake,
    ) -> Result<Vec<Uuid>, EmitError> {
        let mut ids = Vec::with_capacity(prepared.len());
        for chunk in prepared.chunks(BATCH_CHUNK) {
            ids.extend(self.insert_chunk::<E>(conn, chunk, wake).await?);
        }
        Ok(ids)
    }

    /// Writes up to `BATCH_CHUNK` events in one statement: all, or none if one is too
    /// large.
    async fn insert_chunk<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        chunk: &[Prepared],
        wake: Wake,
    ) -> Result<Vec<Uuid>, EmitError> {
        let notify = self.inner.config.notify && wake == Wake::InTransaction;
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
        #[cfg(feature = "testing")]
        chunk.iter().for_each(Prepared::record::<E>);
        Ok(chunk.iter().map(|p| p.id).collect())
    }
}

crate::support::debug_as_display!(EmitError);
