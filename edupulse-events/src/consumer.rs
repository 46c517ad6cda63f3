//! Consuming events: typed handlers on a durable JetStream pull consumer, with an
//! inbox that makes `on_tx` handlers apply each event's effects once.
//!
//! ```no_run
//! # use edupulse_events::{DomainEvent, EventService, Received};
//! # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
//! # #[event(name = "quiz.submitted")]
//! # struct QuizSubmitted { quiz_id: i64, score: f32 }
//! # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
//! # #[event(name = "lesson.published")]
//! # struct LessonPublished { lesson_id: i64 }
//! # async fn run(service: EventService) -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = service
//!     .consumer("grading")
//!     .on::<QuizSubmitted, _, _>(|received: Received<QuizSubmitted>| async move {
//!         println!("quiz {} scored {}", received.event.quiz_id, received.event.score);
//!         Ok(())
//!     })
//!     .on_tx::<LessonPublished, _>(|tx, received| {
//!         Box::pin(async move {
//!             sqlx::query("INSERT INTO lesson_index (id) VALUES ($1)")
//!                 .bind(received.event.lesson_id)
//!                 .execute(&mut *tx)
//!                 .await?;
//!             Ok(())
//!         })
//!     })
//!     .start()
//!     .await?;
//! consumer.shutdown().await?;
//! # Ok(()) }
//! ```

use crate::causation::Cause;
use crate::service::{EventService, Inner};
use crate::support::pg::{is_unavailable, is_undefined_table};
use crate::support::retry::{backoff, progress_period, sleep_or_stop};
use crate::wire::headers;
use crate::DomainEvent;
use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{AckKind, Message};
use futures::future::BoxFuture;
use futures::StreamExt;
use sqlx::PgConnection;
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

/// What a handler returns on failure: any error; it is logged, the event retried, and
/// after the last delivery recorded in the dead-letter table with this message.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// An event as a handler receives it: the typed event and its envelope.
#[derive(Debug, Clone)]
pub struct Received<E> {
    /// The event.
    pub event: E,
    /// Where it came from and how it travelled.
    pub envelope: Envelope,
}

/// An event's metadata, read from the message's CloudEvents headers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// The event id.
    pub id: Uuid,
    /// The event name.
    pub name: String,
    /// The schema version.
    pub version: u32,
    /// The emitting service.
    pub source: String,
    /// When the event occurred.
    pub time: OffsetDateTime,
    /// The full NATS subject.
    pub subject: String,
    /// The conversation the event belongs to.
    pub correlation_id: Option<Uuid>,
    /// The event that caused it.
    pub causation_id: Option<Uuid>,
    /// Which delivery this is, from 1.
    pub attempt: u32,
    /// The message's sequence number in the stream.
    pub stream_sequence: u64,
}

/// Where a new consumer group starts reading the stream. An existing group goes on
/// where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event the stream holds.
    #[default]
    Beginning,
    /// From events published after the group is created.
    New,
}

/// How a consumer group works; every field has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// How many events are handled at once. Events of one subject always go to the same
    /// lane, so with the default, 1, and with any value, events of one subject reach the
    /// handler in stream order. Default 1.
    ///
    /// The order holds for one running instance of the group, including across the
    /// death of an earlier one: an instance that starts while messages delivered before
    /// it are still unacked (given to an instance that died, say) holds the later
    /// messages, up to `ack_wait` and a margin, until the earlier ones come back, and
    /// handles them all in stream order. It does not hold when several instances run
    /// at once: they share a subject's events, and when one of them dies, the
    /// survivors have already handled later events by the time its unacked ones come
    /// back.
    pub concurrency: usize,
    /// How many times an event is handed to its handler before it is terminated and
    /// recorded in the dead-letter table. Default 5. Only the handler's failures count:
    /// when the framework itself cannot reach Postgres (to begin the `on_tx`
    /// transaction, record the event in the inbox or commit), the event is retried in
    /// its lane, with backoff, for as long as it takes.
    pub max_deliveries: u32,
    /// The delay before the second delivery; doubled each time, with jitter. Default 1 s.
    pub retry_base: Duration,
    /// The longest delay between deliveries. Default 60 s.
    pub retry_max: Duration,
    /// How long JetStream waits for an ack before it redelivers; the consumer sends
    /// progress while a handler runs or waits to retry. Default 30 s.
    pub ack_wait: Duration,
    /// How long `shutdown` lets handlers in flight finish. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Most messages fetched per pull request. Default 100.
    pub fetch_batch: usize,
    /// Where a new group starts. Default [`StartFrom::Beginning`].
    pub start_from: StartFrom,
    /// How long handled event ids are kept in the inbox. Keep it longer than any
    /// republishing can happen. Default 7 days.
    pub inbox_retention: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            concurrency: 1,
            max_deliveries: 5,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ack_wait: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            fetch_batch: 100,
            start_from: StartFrom::Beginning,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A consumer group could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The group name cannot be a JetStream durable name.
    #[error(
        "consumer group name {0:?} is invalid: use letters, digits, `_` and `-`, e.g. `grading`"
    )]
    InvalidGroup(String),
    /// No handler was registered.
    #[error("consumer group `{0}` has no handler; add one with `.on::<Event, _, _>(...)` or `.on_tx::<Event, _>(...)`")]
    NoHandlers(String),
    /// Two handlers were registered for one event type.
    #[error("consumer group `{group}` has two handlers for event `{event}`; register one handler per event type")]
    DuplicateHandler {
        /// The group.
        group: String,
        /// The event name.
        event: &'static str,
    },
    /// A setting is out of range.
    #[error("consumer setting out of range: {0}")]
    Settings(String),
    /// The inbox tables do not exist.
    #[error(
        "the inbox table edupulse.inbox does not exist; call EventService::migrate() at start-up"
    )]
    NotMigrated,
    /// Postgres failed.
    #[error("consumer could not reach Postgres: {0}")]
    Database(#[source] sqlx::Error),
    /// JetStream refused the durable consumer.
    #[error("JetStream refused consumer `{group}` on stream {stream}: {reason}; if its filter changed on a server older than 2.10, delete the consumer (`nats consumer rm {stream} {group}`) and start again")]
    JetStream {
        /// The group.
        group: String,
        /// The stream.
        stream: String,
        /// What JetStream said.
        reason: String,
    },
    /// The consumer task panicked.
    #[error("the consumer task panicked: {0}")]
    Panicked(String),
}

/// What the handler of one event type is.
type Decode = fn(&[u8]) -> Result<Box<dyn Any + Send>, serde_json::Error>;
type PlainCall = Arc<
    dyn Fn(Box<dyn Any + Send>, Envelope) -> BoxFuture<'static, Result<(), HandlerError>>
        + Send
        + Sync,
>;
type TxCall = Arc<
    dyn for<'c> Fn(
            &'c mut PgConnection,
            Box<dyn Any + Send>,
            Envelope,
        ) -> BoxFuture<'c, Result<(), HandlerError>>
        + Send
        + Sync,
>;

#[derive(Clone)]
enum Call {
    Plain(PlainCall),
    Tx(TxCall),
}

#[derive(Clone)]
struct Route {
    name: &'static str,
    version: u32,
    /// The subject filter, relative to the prefix, e.g. `quiz.*.submitted`.
    filter: String,
    decode: Decode,
    call: Call,
}

fn decode_any<E: DomainEvent>(payload: &[u8]) -> Result<Box<dyn Any + Send>, serde_json::Error> {
    Ok(Box::new(serde_json::from_slice::<E>(payload)?))
}

/// Unboxes what `decode_any::<E>` made.
fn unbox<E: DomainEvent>(event: Box<dyn Any + Send>) -> Result<E, HandlerError> {
    event
        .downcast::<E>()
        .map(|event| *event)
        .map_err(|_| format!("internal: payload did not decode as {}", E::NAME).into())
}

/// A message a consumer group could not handle, as [`EventService::dead_letters`]
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The record's id.
    pub id: i64,
    /// The consumer group.
    pub consumer_group: String,
    /// `handler_failed`, `undecodable`, `unknown_event` or `unknown_version`.
    pub reason: String,
    /// What went wrong.
    pub error: String,
    /// The event id, when the message had a valid one.
    pub event_id: Option<Uuid>,
    /// The event name, when the message had one.
    pub event_name: Option<String>,
    /// The full NATS subject.
    pub subject: String,
    /// The message's stream sequence.
    pub stream_sequence: i64,
    /// How many deliveries it had.
    pub deliveries: i32,
    /// The raw body.
    pub payload: Vec<u8>,
}

impl EventService {
    /// Lists the dead letters of `group`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// The Postgres error, if the query failed.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, sqlx::Error> {
        use sqlx::Row;
        let rows = sqlx::query(
            "SELECT id, consumer_group, reason, error, event_id, event_name, subject,
                    stream_sequence, deliveries, payload
             FROM edupulse.dead_letters WHERE consumer_group = $1 ORDER BY id LIMIT $2",
        )
        .bind(group)
        .bind(limit)
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: row.try_get("id")?,
                    consumer_group: row.try_get("consumer_group")?,
                    reason: row.try_get("reason")?,
                    error: row.try_get("error")?,
                    event_id: row.try_get("event_id")?,
                    event_name: row.try_get("event_name")?,
                    subject: row.try_get("subject")?,
                    stream_sequence: row.try_get("stream_sequence")?,
                    deliveries: row.try_get("deliveries")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }
}

/// Deletes inbox entries of events older than the retention, in bounded batches.
/// Event ids are UUID v7, so "older" is a range of the primary key.
async fn prune_inbox(ctx: &Ctx) -> Result<u64, sqlx::Error> {
    let cutoff = std::time::SystemTime::now()
        .checked_sub(ctx.settings.inbox_retention)
        .unwrap_or(std::time::UNIX_EPOCH);
    let since_epoch = cutoff
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let millis = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
    // The smallest v7 id of that millisecond: every id below it is older.
    let bound = uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid();
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM edupulse.inbox WHERE consumer_group = $1 AND event_id IN (
                SELECT event_id FROM edupulse.inbox
                WHERE consumer_group = $1 AND event_id < $2
                ORDER BY event_id LIMIT 1000)",
        )
        .bind(&ctx.group)
        .bind(bound)
        .execute(&ctx.inner.pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < 1000 {
            return Ok(total);
        }
    }
}

/// Builds a consumer group; see [`EventService::consumer`].
#[must_use]
pub struct ConsumerBuilder {
    service: EventService,
    group: String,
    routes: Vec<Route>,
    settings: ConsumerSettings,
}

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("group", &self.group)
            .field(
                "events",
                &self.routes.iter().map(|r| r.name).collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

impl EventService {
    /// Starts building the consumer group `group`: one durable JetStream consumer,
    /// shared by every instance started with the same name.
    pub fn consumer(&self, group: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder {
            service: self.clone(),
            group: group.into(),
            routes: Vec::new(),
            settings: ConsumerSettings::default(),
        }
    }
}

fn filter_of(template: &str) -> String {
    template
        .split('.')
        .map(|token| if token.starts_with('{') { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

impl ConsumerBuilder {
    /// Handles events of type `E` with `handler`: at least once; an `Ok` is acked, an
    /// error retried. Use [`ConsumerBuilder::on_tx`] for effects in Postgres that must
    /// happen once.
    pub fn on<E, F, Fut>(mut self, handler: F) -> Self
    where
        E: DomainEvent,
        F: Fn(Received<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let call: PlainCall = Arc::new(move |event, envelope| {
            let handler = handler.clone();
            Box::pin(async move {
                let event = unbox::<E>(event)?;
                handler(Received { event, envelope }).await
            })
        });
        self.routes.push(Route {
            name: E::NAME,
            version: E::VERSION,
            filter: filter_of(E::SUBJECT_TEMPLATE),
            decode: decode_any::<E>,
            call: Call::Plain(call),
        });
        self
    }

    /// Handles events of type `E` inside a Postgres transaction that also records the
    /// event in the inbox: the effects commit once, a redelivered or duplicate event is
    /// skipped (and acked) without calling the handler, and the message is acked only
    /// after the commit. Events the handler emits with `emit_in` on `tx` carry the
    /// incoming event's id as causation id and its correlation id.
    ///
    /// The handler returns a boxed future that borrows the transaction, as sqlx's
    /// `Connection::transaction` does: `|tx, received| Box::pin(async move { ... })`.
    pub fn on_tx<E, F>(mut self, handler: F) -> Self
    where
        E: DomainEvent,
        F: for<'c> Fn(&'c mut PgConnection, Received<E>) -> BoxFuture<'c, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        let handler = Arc::new(handler);
        let call: TxCall = Arc::new(move |tx, event, envelope| {
            let handler = handler.clone();
            Box::pin(async move {
                let event = unbox::<E>(event)?;
                handler(tx, Received { event, envelope }).await
            })
        });
        self.routes.push(Route {
            name: E::NAME,
            version: E::VERSION,
            filter: filter_of(E::SUBJECT_TEMPLATE),
            decode: decode_any::<E>,
            call: Call::Tx(call),
        });
        self
    }

    /// Replaces every setting.
    pub fn settings(mut self, settings: ConsumerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// How many events are handled at once (events of one subject stay in order).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.settings.concurrency = concurrency;
        self
    }

    /// How many deliveries an event gets before it is dead-lettered.
    pub fn max_deliveries(mut self, max: u32) -> Self {
        self.settings.max_deliveries = max;
        self
    }

    /// Creates or updates the durable consumer and starts handling events.
    ///
    /// # Errors
    /// [`ConsumerError`] when the group is invalid, a handler is registered twice, the
    /// schema is missing or JetStream refuses the consumer.
    pub async fn start(self) -> Result<ConsumerHandle, ConsumerError> {
        let ConsumerBuilder {
            service,
            group,
            routes,
            settings,
        } = self;
        let inner = service.inner.clone();
        if group.is_empty()
            || group.len() > 128
            || !group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConsumerError::InvalidGroup(group));
        }
        if routes.is_empty() {
            return Err(ConsumerError::NoHandlers(group));
        }
        let mut by_name: HashMap<&'static str, Route> = HashMap::new();
        for route in routes {
            let name = route.name;
            if by_name.insert(name, route).is_some() {
                return Err(ConsumerError::DuplicateHandler { group, event: name });
            }
        }
        if settings.concurrency == 0 || settings.concurrency > 1024 {
            return Err(ConsumerError::Settings(format!(
                "concurrency {} is out of range; use 1 to 1024",
                settings.concurrency
            )));
        }
        if settings.max_deliveries == 0 || settings.fetch_batch == 0 || settings.ack_wait.is_zero()
        {
            return Err(ConsumerError::Settings(
                "max_deliveries, fetch_batch and ack_wait must be more than zero".to_owned(),
            ));
        }
        sqlx::query("SELECT 1 FROM edupulse.inbox LIMIT 0")
            .execute(&inner.pool)
            .await
            .map_err(|e| {
                if is_undefined_table(&e) {
                    ConsumerError::NotMigrated
                } else {
                    ConsumerError::Database(e)
                }
            })?;

        let prefix = &inner.config.subject_prefix;
        let mut filters: Vec<String> = by_name.values().map(|r| r.filter.clone()).collect();
        filters.sort();
        filters.dedup();
        let full: Vec<String> = filters.iter().map(|f| format!("{prefix}.{f}")).collect();
        let multi_filter = server_at_least(&inner.nats, 2, 10) && !any_overlap(&filters);
        let mut config = pull::Config {
            durable_name: Some(group.clone()),
            description: Some(format!("edupulse-events consumer group {group}")),
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            // Deliveries are counted and dead-lettered here; the server never gives up
            // on a message by itself, so none disappears silently.
            max_deliver: -1,
            max_ack_pending: i64::try_from(settings.concurrency * settings.fetch_batch * 2)
                .unwrap_or(i64::MAX),
            deliver_policy: match settings.start_from {
                StartFrom::Beginning => DeliverPolicy::All,
                StartFrom::New => DeliverPolicy::New,
            },
            ..Default::default()
        };
        if full.len() == 1 {
            config.filter_subject = full[0].clone();
        } else if multi_filter {
            config.filter_subjects = full;
        } else {
            // Servers before 2.10 take one filter: read the prefix, skip what is not ours.
            config.filter_subject = format!("{prefix}.>");
        }
        let js_error = |reason: String| ConsumerError::JetStream {
            group: group.clone(),
            stream: inner.config.stream.clone(),
            reason,
        };
        let stream = inner
            .jetstream
            .get_stream(&inner.config.stream)
            .await
            .map_err(|e| js_error(e.to_string()))?;
        let consumer: PullConsumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| js_error(e.to_string()))?;

        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let ctx = Arc::new(Ctx {
            inner: inner.clone(),
            group: group.clone(),
            routes: by_name,
            filters,
            settings,
            stats: stats.clone(),
            crash: tokio::sync::Notify::new(),
            queued: std::sync::Mutex::new(BTreeSet::new()),
        });
        tracing::info!(group = %group, "consumer started");
        let task = tokio::spawn(run(ctx, consumer, stop_rx).instrument(tracing::info_span!(
            "edupulse.consumer",
            group = %group
        )));
        Ok(ConsumerHandle { stop, task, stats })
    }
}

fn server_at_least(client: &async_nats::Client, major: u32, minor: u32) -> bool {
    let version = client.server_info().version;
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

fn tokens_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(x, y)| x == y || *x == "*" || *y == "*")
}

fn any_overlap(filters: &[String]) -> bool {
    filters
        .iter()
        .enumerate()
        .any(|(i, a)| filters[i + 1..].iter().any(|b| tokens_overlap(a, b)))
}

/// Whether `subject` (relative to the prefix) matches `filter` (`*` matches one token).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let (f, s): (Vec<&str>, Vec<&str>) =
        (filter.split('.').collect(), subject.split('.').collect());
    f.len() == s.len() && f.iter().zip(&s).all(|(f, s)| *f == "*" || f == s)
}

#[derive(Debug, Default)]
struct Stats {
    handled: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    crash_before_ack: AtomicBool,
    crashed: AtomicBool,
}

struct Ctx {
    inner: Arc<Inner>,
    /// Wakes the fetch loop when a simulated crash happens.
    crash: tokio::sync::Notify,
    group: String,
    routes: HashMap<&'static str, Route>,
    filters: Vec<String>,
    settings: ConsumerSettings,
    stats: Arc<Stats>,
    /// Messages handed to a lane and waiting in its queue, by reply subject (one per
    /// delivery): the fetch loop sends them progress, so that a long queue is not
    /// redelivered while this instance still has it.
    queued: std::sync::Mutex<BTreeSet<async_nats::Subject>>,
}

impl Ctx {
    fn enqueued(&self, message: &Message) {
        if let Some(reply) = &message.reply {
            if let Ok(mut queued) = self.queued.lock() {
                queued.insert(reply.clone());
            }
        }
    }

    fn dequeued(&self, message: &Message) {
        if let Some(reply) = &message.reply {
            if let Ok(mut queued) = self.queued.lock() {
                queued.remove(reply);
            }
        }
    }

    /// Tells JetStream the messages waiting in the lanes' queues are in progress (what
    /// `ack_with(AckKind::Progress)` sends, to each one's reply subject).
    async fn progress_queued(&self) {
        let waiting: Vec<async_nats::Subject> = match self.queued.lock() {
            Ok(queued) => queued.iter().cloned().collect(),
            Err(_) => return,
        };
        if waiting.is_empty() {
            return;
        }
        let client = self.inner.jetstream.client();
        for reply in waiting {
            let _ = client
                .publish(reply, bytes::Bytes::from(AckKind::Progress))
                .await;
        }
    }
}

/// A running consumer group instance; stop it with [`ConsumerHandle::shutdown`].
#[derive(Debug)]
pub struct ConsumerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
}

impl ConsumerHandle {
    /// How many events this instance handled successfully.
    pub fn handled(&self) -> u64 {
        self.stats.handled.load(Ordering::SeqCst)
    }

    /// How many duplicate deliveries the inbox skipped.
    pub fn duplicates(&self) -> u64 {
        self.stats.duplicates.load(Ordering::SeqCst)
    }

    /// How many messages this instance recorded in the dead-letter table.
    pub fn dead_lettered(&self) -> u64 {
        self.stats.dead_lettered.load(Ordering::SeqCst)
    }

    /// Test hook: the next `on_tx` event is committed, then the instance stops without
    /// acking or naking anything, as if its process died there.
    #[doc(hidden)]
    pub fn __crash_after_commit(&self) {
        self.stats.crash_before_ack.store(true, Ordering::SeqCst);
    }

    /// Test hook: tells the instance to stop (as [`ConsumerHandle::shutdown`] does)
    /// without waiting; `shutdown` still waits for it.
    #[doc(hidden)]
    pub fn __begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether the instance has stopped (after a shutdown or a simulated crash).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops fetching, lets handlers in flight finish (up to `shutdown_timeout`), acks
    /// what succeeded, hands queued messages back to JetStream, and returns.
    ///
    /// # Errors
    /// [`ConsumerError::Panicked`] if the consumer task panicked.
    pub async fn shutdown(self) -> Result<(), ConsumerError> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| ConsumerError::Panicked(e.to_string()))
    }
}

/// How long one pull request lasts. async-nats sends the next one when the last is
/// half used, or, if the server never answers (it has lost the request; the client
/// then reports missed heartbeats), this long plus 5 s after it: a longer expiry made
/// a 35 s stall, seen about once in seven 50,000-message runs against nats-server
/// 2.9.10 (BENCHMARKS.md).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's idle heartbeat on a pull request (at most half of its expiry).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// How often an instance that catches up (see [`Gate`]) reads the group's ack floor.
const CATCH_UP_POLL: Duration = Duration::from_millis(50);

/// How long an instance catches up at most: `ack_wait` (by then every message of an
/// instance that died before it started has come back) and a margin.
fn catch_up_limit(ack_wait: Duration) -> Duration {
    ack_wait + (ack_wait / 2).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// The stream sequence up to which everything delivered to the group is acked. A group
/// that started at new messages (or on a purged stream) reports an ack floor of 0 below
/// a delivered sequence it never delivered; with nothing awaiting an ack, the
/// delivered sequence is the floor.
fn acked_through(info: &consumer::Info) -> u64 {
    if info.num_ack_pending == 0 {
        info.delivered.stream_sequence
    } else {
        info.ack_floor.stream_sequence
    }
}

/// Keeps the handled order of a group across the death of one of its instances.
///
/// The messages delivered to an instance that died stay pending on the server until
/// their `ack_wait` passes, and then come back after the messages that follow them,
/// in the order their timers expire. So when this instance starts pulling (at start,
/// and whenever its pull stream restarts) while the group has messages delivered and
/// not acked (its ack floor is below the last stream sequence delivered, the *mark*),
/// it *catches up*: every message it receives is held, by stream sequence (with
/// progress sent, so that it is not redelivered), and handed to its lane only once
/// every earlier message of the group is acked (the ack floor, read every
/// [`CATCH_UP_POLL`]) or was handed to a lane of this instance: its lanes then handle
/// them in stream order. It stops catching up when everything up to the mark is so,
/// or at the latest [`catch_up_limit`] after it began: by then every message of an
/// instance that had died has come back (its timer had started before), and what
/// has not is in the hands of a live instance, whose order relative to this one the
/// group does not keep anyway. The held messages are then released in stream order.
///
/// Held messages count toward the group's `max_ack_pending`; redeliveries do not, so
/// they always reach this instance, and live instances go on with the messages they
/// have. On shutdown, held messages are handed back (nak); after a simulated crash
/// they are left to expire.
#[derive(Default)]
struct Gate {
    /// When catching up must end; `None` when not catching up.
    deadline: Option<Instant>,
    /// The last stream sequence delivered to the group when catching up began.
    mark: u64,
    /// Every message of the group up to this stream sequence is acked, or was handed
    /// to one of this instance's lanes while catching up.
    through: u64,
    /// Messages received while catching up and not handed to a lane yet.
    held: BTreeMap<u64, Message>,
}

impl Gate {
    fn catching_up(&self) -> bool {
        self.deadline.is_some()
    }

    /// Catches up if the group has messages delivered and not acked. `info` is the
    /// group's state read before pulling; without it, catches up to the limit.
    fn arm(&mut self, info: Option<&consumer::Info>, ack_wait: Duration) {
        let (mark, floor) = match info {
            Some(info) => (info.delivered.stream_sequence, acked_through(info)),
            None => (u64::MAX, 0),
        };
        if floor >= mark && !self.catching_up() {
            return;
        }
        if self.catching_up() {
            // A restart while catching up: the limit runs on, unless more has been
            // delivered meanwhile (to an instance that may have died since).
            if mark > self.mark {
                self.deadline = Some(Instant::now() + catch_up_limit(ack_wait));
            }
            self.mark = self.mark.max(mark);
            self.through = self.through.max(floor);
        } else {
            self.mark = mark;
            self.through = floor;
            self.deadline = Some(Instant::now() + catch_up_limit(ack_wait));
        }
        tracing::info!(
            mark = self.mark,
            ack_floor = floor,
            "messages delivered before this instance pulled are not acked yet; \
             holding later ones until they are, to keep each subject's order"
        );
        self.check_done();
    }

    /// Takes the group's ack floor, as just read.
    fn observe_floor(&mut self, floor: u64) {
        self.through = self.through.max(floor);
        self.check_done();
    }

    /// Stops catching up when everything up to the mark is acked or in a lane here,
    /// or when the deadline has passed.
    fn check_done(&mut self) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if self.through >= self.mark {
            tracing::debug!(mark = self.mark, "caught up");
            self.deadline = None;
        } else if Instant::now() >= deadline {
            tracing::info!(
                mark = self.mark,
                through = self.through,
                held = self.held.len(),
                "stopped waiting for earlier unacked messages (another live instance \
                 has them, or they are late); releasing the held ones in stream order"
            );
            self.deadline = None;
        }
    }

    /// Takes a received message: returns it if it goes to its lane now, else holds it.
    fn admit(&mut self, message: Message) -> Option<Message> {
        if !self.catching_up() && self.held.is_empty() {
            return Some(message);
        }
        let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
            return Some(message);
        };
        if sequence <= self.through {
            // Acked or already in a lane: a late copy, which the lane handles as any.
            return Some(message);
        }
        // A newer delivery of a held message replaces it (either acks it).
        self.held.insert(sequence, message);
        None
    }

    /// The next held message that may go to its lane now, lowest stream sequence first.
    fn next_release(&mut self) -> Option<Message> {
        let (&sequence, _) = self.held.first_key_value()?;
        if self.catching_up() && sequence > self.through.saturating_add(1) {
            return None;
        }
        self.through = self.through.max(sequence);
        let message = self.held.pop_first().map(|(_, message)| message);
        self.check_done();
        message
    }

    /// Tells JetStream the held messages are in progress, so that none is redelivered.
    async fn progress(&self) {
        for message in self.held.values() {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

/// Hands `message` to its lane; false if the lane has gone.
///
/// The lanes' queues are unbounded: the server delivers at most `max_ack_pending`
/// messages not acked, which bounds them, and the fetch loop never waits on a lane, so
/// no delivered message waits where it cannot be sent progress (in the pull stream's
/// own buffer, say) and be redelivered while this instance still has it.
fn dispatch(
    ctx: &Ctx,
    lanes: &[(mpsc::UnboundedSender<Message>, JoinHandle<()>)],
    message: Message,
) -> bool {
    let lane = lane_of(message.subject.as_str(), lanes.len());
    ctx.enqueued(&message);
    match lanes[lane].0.send(message) {
        Ok(()) => true,
        Err(mpsc::error::SendError(message)) => {
            ctx.dequeued(&message);
            false
        }
    }
}

/// What the fetch loop woke up for.
enum Woke {
    Message(Box<Message>),
    Tick,
    Restart,
    Stop,
}

async fn run(ctx: Arc<Ctx>, consumer: PullConsumer, mut stop: watch::Receiver<bool>) {
    let lanes: Vec<(mpsc::UnboundedSender<Message>, JoinHandle<()>)> =
        (0..ctx.settings.concurrency)
            .map(|lane| {
                let (tx, rx) = mpsc::unbounded_channel::<Message>();
                let ctx = ctx.clone();
                let stop = stop.clone();
                let task = tokio::spawn(
                    run_lane(ctx, rx, stop).instrument(tracing::debug_span!("lane", lane)),
                );
                (tx, task)
            })
            .collect();

    let pruner = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                match prune_inbox(&ctx).await {
                    Ok(deleted) if deleted > 0 => tracing::debug!(deleted, "pruned the inbox"),
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "inbox pruning failed; trying later"),
                }
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
        })
    };

    let mut gate = Gate::default();
    let progress_period = progress_period(ctx.settings.ack_wait);
    'fetch: loop {
        if *stop.borrow() || ctx.stats.crashed.load(Ordering::SeqCst) {
            break;
        }
        // What the group had been given before this instance pulls: see `Gate`.
        let info = match consumer.get_info().await {
            Ok(info) => Some(info),
            Err(error) => {
                tracing::warn!(%error, "cannot read the consumer group's state; holding new messages until ack_wait has passed");
                None
            }
        };
        gate.arm(info.as_ref(), ctx.settings.ack_wait);
        let messages = consumer
            .stream()
            .max_messages_per_batch(ctx.settings.fetch_batch)
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "cannot pull from JetStream; retrying");
                if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        let mut poll = tokio::time::interval(CATCH_UP_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress =
            tokio::time::interval_at(Instant::now() + progress_period, progress_period);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let woke = tokio::select! {
                next = messages.next() => match next {
                    Some(Ok(message)) => Woke::Message(Box::new(message)),
                    Some(Err(error)) => {
                        tracing::debug!(%error, "pull stream error");
                        Woke::Tick
                    }
                    // The pull stream ended (the consumer was deleted, say): start anew.
                    None => Woke::Restart,
                },
                _ = stop.changed() => Woke::Stop,
                _ = ctx.crash.notified() => Woke::Stop,
                _ = poll.tick(), if gate.catching_up() => {
                    match consumer.get_info().await {
                        Ok(info) => gate.observe_floor(acked_through(&info)),
                        Err(error) => {
                            tracing::debug!(%error, "cannot read the group's ack floor");
                            gate.check_done();
                        }
                    }
                    Woke::Tick
                }
                _ = progress.tick() => {
                    gate.progress().await;
                    ctx.progress_queued().await;
                    Woke::Tick
                }
            };
            if ctx.stats.crashed.load(Ordering::SeqCst) {
                break 'fetch;
            }
            match woke {
                Woke::Stop => break 'fetch,
                Woke::Restart => {
                    if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                        break 'fetch;
                    }
                    continue 'fetch;
                }
                Woke::Tick => {}
                Woke::Message(message) => {
                    if let Some(message) = gate.admit(*message) {
                        if !dispatch(&ctx, &lanes, message) {
                            break 'fetch;
                        }
                    }
                }
            }
            while let Some(message) = gate.next_release() {
                if !dispatch(&ctx, &lanes, message) {
                    break 'fetch;
                }
            }
        }
    }

    pruner.abort();
    if !ctx.stats.crashed.load(Ordering::SeqCst) {
        // Not handed to a lane: back to JetStream, like the lanes' queued messages.
        for message in std::mem::take(&mut gate.held).into_values() {
            give_back(&message).await;
        }
    }
    // Stop fetching; lanes finish the event in hand and give queued ones back.
    let (senders, tasks): (Vec<_>, Vec<_>) = lanes.into_iter().unzip();
    drop(senders);
    let deadline = Instant::now() + ctx.settings.shutdown_timeout;
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!("a handler did not finish within shutdown_timeout; abandoning it (its event will be redelivered)");
            task.abort();
        }
    }
    if !ctx.stats.crashed.load(Ordering::SeqCst) {
        // Acks are published without waiting; make sure they left.
        let _ = ctx.inner.nats.flush().await;
    }
    tracing::info!("consumer stopped");
}

fn lane_of(subject: &str, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    subject.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

/// Hands a message back for immediate redelivery (to this group's other instances).
async fn give_back(message: &Message) {
    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
        tracing::debug!(%error, "could not nak a message; it is redelivered after ack_wait");
    }
}

async fn run_lane(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut stop: watch::Receiver<bool>,
) {
    while let Some(message) = rx.recv().await {
        // From here `process` sends progress itself while it works.
        ctx.dequeued(&message);
        if ctx.stats.crashed.load(Ordering::SeqCst) {
            // A dead process acks and naks nothing.
            continue;
        }
        if *stop.borrow() {
            give_back(&message).await;
            continue;
        }
        process(&ctx, &message, &mut stop).await;
    }
}

/// Why a message goes to the dead-letter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeadReason {
    HandlerFailed,
    Undecodable,
    UnknownEvent,
    UnknownVersion,
}

impl DeadReason {
    fn as_str(self) -> &'static str {
        match self {
            DeadReason::HandlerFailed => "handler_failed",
            DeadReason::Undecodable => "undecodable",
            DeadReason::UnknownEvent => "unknown_event",
            DeadReason::UnknownVersion => "unknown_version",
        }
    }
}

enum Parsed<'a> {
    /// Not this group's (servers before 2.10 deliver the whole prefix).
    NotOurs,
    Dead(DeadReason, String),
    Event(&'a Route, Envelope),
}

fn header<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

fn parse<'c>(ctx: &'c Ctx, message: &Message, delivered: u32, sequence: u64) -> Parsed<'c> {
    let prefix = &ctx.inner.config.subject_prefix;
    let subject = message.subject.as_str();
    let relative = subject
        .strip_prefix(prefix.as_str())
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(subject);
    if !ctx.filters.iter().any(|f| subject_matches(f, relative)) {
        return Parsed::NotOurs;
    }
    let Some(name) = header(message, headers::TYPE) else {
        return Parsed::Dead(
            DeadReason::Undecodable,
            "the message has no ce-type header".to_owned(),
        );
    };
    let Some(route) = ctx.routes.get(name) else {
        return Parsed::Dead(
            DeadReason::UnknownEvent,
            format!(
                "no handler in group `{}` for event `{name}` on subject {subject}",
                ctx.group
            ),
        );
    };
    let Some(id) = header(message, headers::ID).and_then(|v| v.parse::<Uuid>().ok()) else {
        return Parsed::Dead(
            DeadReason::Undecodable,
            "the message has no valid ce-id header (a UUID)".to_owned(),
        );
    };
    let version = match header(message, headers::VERSION).map(str::parse::<u32>) {
        None => 1,
        Some(Ok(version)) => version,
        Some(Err(_)) => {
            return Parsed::Dead(
                DeadReason::Undecodable,
                "the ce-eventversion header is not a number".to_owned(),
            )
        }
    };
    if version != route.version {
        return Parsed::Dead(
            DeadReason::UnknownVersion,
            format!(
                "event `{name}` has version {version}; this consumer handles version {}",
                route.version
            ),
        );
    }
    let time = header(message, headers::TIME)
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .unwrap_or_else(OffsetDateTime::now_utc);
    let uuid_header = |name| header(message, name).and_then(|v| v.parse::<Uuid>().ok());
    Parsed::Event(
        route,
        Envelope {
            id,
            name: name.to_owned(),
            version,
            source: header(message, headers::SOURCE).unwrap_or("").to_owned(),
            time,
            subject: subject.to_owned(),
            correlation_id: uuid_header(headers::CORRELATION_ID),
            causation_id: uuid_header(headers::CAUSATION_ID),
            attempt: delivered,
            stream_sequence: sequence,
        },
    )
}

enum Outcome {
    Handled,
    Duplicate,
    /// The handler failed: counts toward `max_deliveries`.
    Failed(String),
    /// The framework could not reach Postgres (begin, inbox insert, commit): retried
    /// without counting toward `max_deliveries`.
    Unavailable(String),
    Crashed,
}

/// The outcome of a failed framework statement: [`Outcome::Unavailable`] if Postgres
/// could not be reached, else [`Outcome::Failed`].
fn framework_failure(what: &str, error: &sqlx::Error) -> Outcome {
    let why = format!("{what}: {error}");
    if is_unavailable(error) {
        Outcome::Unavailable(why)
    } else {
        Outcome::Failed(why)
    }
}

async fn process(ctx: &Ctx, message: &Message, stop: &mut watch::Receiver<bool>) {
    let (delivered, sequence) = match message.info() {
        Ok(info) => (
            u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
            info.stream_sequence,
        ),
        Err(_) => (1, 0),
    };
    let (route, envelope) = match parse(ctx, message, delivered, sequence) {
        Parsed::NotOurs => {
            ack(message).await;
            return;
        }
        Parsed::Dead(reason, why) => {
            let record = DeadRecord {
                reason,
                why: &why,
                envelope: None,
                deliveries: delivered,
                sequence,
            };
            dead_letter(ctx, message, stop, record).await;
            return;
        }
        Parsed::Event(route, envelope) => (route, envelope),
    };
    let span = tracing::debug_span!("edupulse.handle", event = route.name, id = %envelope.id);
    let mut attempt = delivered;
    // Retries because Postgres was unreachable, for their backoff; they do not count
    // toward `max_deliveries`.
    let mut outages: u32 = 0;
    loop {
        let event = match (route.decode)(&message.payload) {
            Ok(event) => event,
            Err(error) => {
                let why = format!("payload does not decode as `{}`: {error}", route.name);
                dead_letter(
                    ctx,
                    message,
                    stop,
                    DeadRecord {
                        reason: DeadReason::Undecodable,
                        why: &why,
                        envelope: Some(&envelope),
                        deliveries: attempt,
                        sequence,
                    },
                )
                .await;
                return;
            }
        };
        let mut this = envelope.clone();
        this.attempt = attempt;
        let cause = Cause::of(envelope.id, envelope.correlation_id);
        let handling = cause.scope(handle(ctx, route, event, this));
        let outcome = with_progress(message, ctx.settings.ack_wait, handling)
            .instrument(span.clone())
            .await;
        match outcome {
            Outcome::Handled => {
                ctx.stats.handled.fetch_add(1, Ordering::SeqCst);
                ack(message).await;
                return;
            }
            Outcome::Duplicate => {
                ctx.stats.duplicates.fetch_add(1, Ordering::SeqCst);
                ack(message).await;
                return;
            }
            Outcome::Crashed => return,
            Outcome::Unavailable(why) => {
                outages = outages.saturating_add(1);
                let delay = backoff(
                    ctx.settings.retry_base,
                    ctx.settings.retry_max,
                    i32::try_from(outages).unwrap_or(i32::MAX),
                );
                tracing::warn!(
                    group = %ctx.group, event = route.name, id = %envelope.id, attempt,
                    retry_in = ?delay, error = %why,
                    "Postgres is unreachable; retrying (not counted as a failed delivery)"
                );
                if wait_in_lane(ctx, message, stop, delay).await {
                    return;
                }
            }
            Outcome::Failed(why) => {
                outages = 0;
                if attempt >= ctx.settings.max_deliveries {
                    dead_letter(
                        ctx,
                        message,
                        stop,
                        DeadRecord {
                            reason: DeadReason::HandlerFailed,
                            why: &why,
                            envelope: Some(&envelope),
                            deliveries: attempt,
                            sequence,
                        },
                    )
                    .await;
                    return;
                }
                let delay = backoff(
                    ctx.settings.retry_base,
                    ctx.settings.retry_max,
                    i32::try_from(attempt).unwrap_or(i32::MAX),
                );
                tracing::warn!(
                    group = %ctx.group, event = route.name, id = %envelope.id, attempt,
                    retry_in = ?delay, error = %why, "handler failed; retrying"
                );
                if wait_in_lane(ctx, message, stop, delay).await {
                    return;
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// Waits `delay` before the next try, in the lane (which keeps later events of the
/// subject behind it) and with progress sent. True if the instance is shutting down:
/// the message has then been handed back for JetStream to redeliver later.
async fn wait_in_lane(
    ctx: &Ctx,
    message: &Message,
    stop: &mut watch::Receiver<bool>,
    delay: Duration,
) -> bool {
    let stopping = with_progress(message, ctx.settings.ack_wait, async {
        sleep_or_stop(stop, delay).await
    })
    .await;
    if stopping {
        give_back(message).await;
    }
    stopping
}

/// Runs `work`, telling JetStream the message is still in progress every third of
/// `ack_wait`, so that a slow handler or a retry wait does not cause a redelivery.
async fn with_progress<T>(
    message: &Message,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let period = progress_period(ack_wait);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

async fn handle(
    ctx: &Ctx,
    route: &Route,
    event: Box<dyn Any + Send>,
    envelope: Envelope,
) -> Outcome {
    match &route.call {
        Call::Plain(call) => match call(event, envelope).await {
            Ok(()) => Outcome::Handled,
            Err(error) => Outcome::Failed(error.to_string()),
        },
        Call::Tx(call) => {
            let mut tx = match ctx.inner.pool.begin().await {
                Ok(tx) => tx,
                Err(error) => return framework_failure("cannot begin a transaction", &error),
            };
            let inserted = sqlx::query(
                "INSERT INTO edupulse.inbox (consumer_group, event_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&ctx.group)
            .bind(envelope.id)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(result) if result.rows_affected() == 0 => {
                    let _ = tx.rollback().await;
                    return Outcome::Duplicate;
                }
                Ok(_) => {}
                Err(error) => {
                    return framework_failure("cannot record the event in the inbox", &error)
                }
            }
            if let Err(error) = call(&mut tx, event, envelope).await {
                let _ = tx.rollback().await;
                return Outcome::Failed(error.to_string());
            }
            if let Err(error) = tx.commit().await {
                // If the commit did happen, the retry finds the event in the inbox.
                return framework_failure("cannot commit the handler's transaction", &error);
            }
            if ctx.stats.crash_before_ack.load(Ordering::SeqCst) {
                ctx.stats.crashed.store(true, Ordering::SeqCst);
                ctx.crash.notify_one();
                return Outcome::Crashed;
            }
            Outcome::Handled
        }
    }
}

async fn ack(message: &Message) {
    if let Err(error) = message.ack().await {
        tracing::warn!(%error, "could not ack a message; JetStream will redeliver it");
    }
}

/// What the dead-letter table records about a message.
struct DeadRecord<'a> {
    reason: DeadReason,
    why: &'a str,
    envelope: Option<&'a Envelope>,
    deliveries: u32,
    sequence: u64,
}

/// Records a message in the dead-letter table, then terminates it. If the record
/// cannot be written, it is tried again in the lane, with backoff and progress (later
/// events of the subject wait behind it), until it is written or the instance stops
/// (the message is then handed back).
async fn dead_letter(
    ctx: &Ctx,
    message: &Message,
    stop: &mut watch::Receiver<bool>,
    record: DeadRecord<'_>,
) {
    let DeadRecord {
        reason,
        why,
        envelope,
        deliveries,
        sequence,
    } = record;
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers
        .as_ref()
        .map(|h| {
            h.iter()
                .map(|(name, values)| {
                    let value = values.first().map(|v| v.as_str()).unwrap_or("");
                    (name.to_string(), serde_json::Value::from(value))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut failures: i32 = 0;
    loop {
        let written = sqlx::query(
            "INSERT INTO edupulse.dead_letters
                (consumer_group, reason, error, event_id, event_name, subject, stream_sequence,
                 deliveries, headers, payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&ctx.group)
        .bind(reason.as_str())
        .bind(why)
        .bind(envelope.map(|e| e.id))
        .bind(
            envelope
                .map(|e| e.name.as_str())
                .or(header(message, headers::TYPE)),
        )
        .bind(message.subject.as_str())
        .bind(i64::try_from(sequence).unwrap_or(i64::MAX))
        .bind(i32::try_from(deliveries).unwrap_or(i32::MAX))
        .bind(serde_json::Value::Object(headers.clone()))
        .bind(message.payload.as_ref())
        .execute(&ctx.inner.pool)
        .await;
        match written {
            Ok(_) => {
                ctx.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    group = %ctx.group, reason = reason.as_str(), subject = %message.subject,
                    error = %why, "message moved to the dead-letter table"
                );
                if let Err(error) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(%error, "could not terminate a dead-lettered message");
                }
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = backoff(ctx.settings.retry_base, ctx.settings.retry_max, failures);
                tracing::error!(
                    %error, group = %ctx.group, retry_in = ?delay,
                    "cannot write the dead-letter record; trying again (later events of the \
                     subject wait)"
                );
                if wait_in_lane(ctx, message, stop, delay).await {
                    return;
                }
            }
        }
    }
}
