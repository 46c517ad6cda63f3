//! [`Emitter`]: writing events into the outbox with Postgres alone, for processes that
//! only emit (a web server, a batch job), and the same calls on [`EventService`].

use super::{DeadEvent, EmitError, EventState, OutboxError, OutboxStatus, Outgoing, Requeue};
use crate::config::Config;
use crate::migrate::MigrateError;
use crate::registry::registry;
use crate::service::{connect_postgres, ConnectError, EventService};
use crate::DomainEvent;
use sqlx::{PgConnection, PgPool};
use std::fmt;
use std::sync::Arc;
use uuid::Uuid;

/// The largest encoded event an [`Emitter`] built without NATS accepts by default:
/// 1 MiB, nats-server's default `max_payload`.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// Emits events into the outbox with a Postgres connection alone; cheap to clone.
///
/// A process that only writes events (a web server, a batch job) needs no NATS
/// connection: it emits inside its business transactions, and a separate process (an
/// [`EventService`] with [`start_relay`](EventService::start_relay)) publishes what
/// was committed. [`EventService`] offers the same calls and hands out its own emitter
/// with [`EventService::emitter`].
///
/// ```no_run
/// # use edupulse_events::{DomainEvent, Emitter, Config};
/// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
/// # #[event(name = "quiz.submitted")]
/// # struct QuizSubmitted { quiz_id: i64 }
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let emitter = Emitter::connect(Config::from_env()?).await?;
/// emitter.migrate().await?;
/// let mut tx = emitter.pool().begin().await?;
/// // ... the business change on `tx` ...
/// emitter.emit_in(&mut tx, QuizSubmitted { quiz_id: 7 }).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Emitter {
    pub(crate) inner: Arc<EmitterInner>,
}

#[derive(Clone)]
pub(crate) struct EmitterInner {
    pub config: Config,
    pub pool: PgPool,
    /// The largest message (headers and body) accepted.
    pub max_message: usize,
    /// Wakes the relay after the emitter's own transactions commit.
    pub waker: Arc<super::wake::Waker>,
}

impl fmt::Debug for Emitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emitter")
            .field("config", &self.inner.config)
            .field("max_message_size", &self.inner.max_message)
            .finish_non_exhaustive()
    }
}

impl Emitter {
    /// Validates the registry and connects to Postgres (the configuration's NATS
    /// settings are not used).
    ///
    /// # Errors
    /// [`ConnectError`] of kind `Registry` or `Postgres`.
    pub async fn connect(config: Config) -> Result<Emitter, ConnectError> {
        registry().validate()?;
        let (pool, _) = connect_postgres(&config).await?;
        Ok(Emitter::from_pool(pool, config))
    }

    /// An emitter on the application's own pool. It does not check the registry (call
    /// [`Registry::validate`](crate::Registry::validate) once at start-up) and does not
    /// connect: the first emit does.
    pub fn from_pool(pool: PgPool, config: Config) -> Emitter {
        Emitter::new(config, pool, DEFAULT_MAX_MESSAGE_SIZE)
    }

    pub(crate) fn new(config: Config, pool: PgPool, max_message: usize) -> Emitter {
        Emitter {
            inner: Arc::new(EmitterInner {
                waker: Arc::new(super::wake::Waker::new(pool.clone())),
                config,
                pool,
                max_message,
            }),
        }
    }

    /// Sets the largest encoded event (headers and JSON body) this emitter accepts;
    /// default [`DEFAULT_MAX_MESSAGE_SIZE`]. Set it to the `max_payload` of your NATS
    /// servers (or the stream's `max_msg_size`, if lower) when they differ from the
    /// default: an event larger than the servers accept is refused by the relay and
    /// ends up dead in the outbox instead of refused here.
    #[must_use]
    pub fn with_max_message_size(mut self, max: usize) -> Emitter {
        Arc::make_mut(&mut self.inner).max_message = max;
        self
    }

    /// Applies the outbox migrations; see [`EventService::migrate`].
    ///
    /// # Errors
    /// [`MigrateError`] when a migration fails or the applied ones were changed.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        crate::migrate::run(&self.inner.pool).await
    }

    /// The Postgres pool, for the application's own queries and transactions.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The configuration the emitter runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The largest encoded event (headers and JSON body) that can be emitted.
    pub fn max_message_size(&self) -> usize {
        self.inner.max_message
    }
}

/// The same calls on the service, through its emitter.
impl EventService {
    /// The service's emitter: the same outbox calls, for code that should not hold
    /// the whole service (it has no NATS connection). Cheap to clone.
    pub fn emitter(&self) -> &Emitter {
        &self.inner.emitter
    }

    /// Emits one event in a transaction of its own; see [`Emitter::emit`].
    ///
    /// # Errors
    /// [`EmitError`]; nothing is written.
    pub async fn emit<E: DomainEvent>(
        &self,
        event: impl Into<Outgoing<E>>,
    ) -> Result<Uuid, EmitError> {
        self.inner.emitter.emit(event).await
    }

    /// Emits one event inside the caller's transaction; see [`Emitter::emit_in`].
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
    /// [`EmitError`]; nothing is written.
    pub async fn emit_in<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        event: impl Into<Outgoing<E>>,
    ) -> Result<Uuid, EmitError> {
        self.inner.emitter.emit_in(conn, event).await
    }

    /// Emits a batch of events of one type in one transaction; see
    /// [`Emitter::emit_all`].
    ///
    /// # Errors
    /// [`EmitError`] for the first event that cannot be emitted; nothing is written.
    pub async fn emit_all<E, I>(&self, events: I) -> Result<Vec<Uuid>, EmitError>
    where
        E: DomainEvent,
        I: IntoIterator,
        I::Item: Into<Outgoing<E>>,
    {
        self.inner.emitter.emit_all(events).await
    }

    /// Emits a batch of events of one type inside the caller's transaction; see
    /// [`Emitter::emit_all_in`].
    ///
    /// # Errors
    /// [`EmitError`] for the first event that cannot be emitted; nothing is written.
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
        self.inner.emitter.emit_all_in(conn, events).await
    }

    /// Counts pending and dead events; see [`Emitter::outbox_status`].
    ///
    /// # Errors
    /// [`OutboxError`]: `NotMigrated` before [`migrate`](EventService::migrate).
    pub async fn outbox_status(&self) -> Result<OutboxStatus, OutboxError> {
        self.inner.emitter.outbox_status().await
    }

    /// Lists dead events; see [`Emitter::dead_events`].
    ///
    /// # Errors
    /// [`OutboxError`].
    pub async fn dead_events(&self, limit: i64) -> Result<Vec<DeadEvent>, OutboxError> {
        self.inner.emitter.dead_events(limit).await
    }

    /// Puts dead events back in line; see [`Emitter::requeue_dead`].
    ///
    /// # Errors
    /// [`OutboxError`].
    pub async fn requeue_dead(&self, which: Requeue) -> Result<u64, OutboxError> {
        self.inner.emitter.requeue_dead(which).await
    }

    /// Where one event stands in the outbox; see [`Emitter::event_state`].
    ///
    /// # Errors
    /// [`OutboxError`].
    pub async fn event_state(&self, id: Uuid) -> Result<Option<EventState>, OutboxError> {
        self.inner.emitter.event_state(id).await
    }
}
