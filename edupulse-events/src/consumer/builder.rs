//! Building and starting a consumer group: [`EventService::consumer`], the handlers
//! ([`ConsumerBuilder::on`], [`ConsumerBuilder::on_tx`]), the settings, and
//! [`ConsumerBuilder::start`], which checks them, creates or updates the durable
//! JetStream consumer and starts the fetch loop.

use super::context::{Ctx, Stats};
use super::envelope::{HandlerError, Received};
use super::inbox;
use super::instance::{self, Instance};
use super::route::{any_overlap, unbox, Call, PlainCall, Route, Routes, TxCall};
use super::settings::ConsumerSettings;
use super::{ConsumerError, ConsumerHandle};
use crate::service::{EventService, Inner};
use crate::telemetry::ConsumerMetrics;
use crate::DomainEvent;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use futures::future::BoxFuture;
use sqlx::PgConnection;
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tracing::Instrument;

/// The longest group name (a JetStream durable name).
const MAX_GROUP_LEN: usize = 128;

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
        self.routes.push(Route::of::<E>(Call::Plain(call)));
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
    /// A closure needs the `Box::pin`: stable Rust cannot yet say that the future a
    /// closure returns borrows the closure's argument for exactly as long as the
    /// argument lives. A named `async fn` can say it: pass one to
    /// [`on_tx_fn`](ConsumerBuilder::on_tx_fn), with no `Box::pin`.
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
        self.routes.push(Route::of::<E>(Call::Tx(call)));
        self
    }

    /// [`on_tx`](ConsumerBuilder::on_tx) for a named `async fn` (or any function whose
    /// future borrows the transaction), with no `Box::pin`:
    ///
    /// ```no_run
    /// # use edupulse_events::{DomainEvent, EventService, HandlerError, Received};
    /// # use edupulse_events::sqlx::PgConnection;
    /// # #[derive(serde::Serialize, serde::Deserialize, DomainEvent)]
    /// # #[event(name = "lesson.published")]
    /// # struct LessonPublished { lesson_id: i64 }
    /// async fn index(tx: &mut PgConnection, received: Received<LessonPublished>) -> Result<(), HandlerError> {
    ///     sqlx::query("INSERT INTO lesson_index (id) VALUES ($1)")
    ///         .bind(received.event.lesson_id)
    ///         .execute(&mut *tx)
    ///         .await?;
    ///     Ok(())
    /// }
    /// # async fn run(service: EventService) -> Result<(), Box<dyn std::error::Error>> {
    /// let consumer = service.consumer("indexer").on_tx_fn(index).start().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A closure that needs captured state (an emitter, a client) can call such a
    /// function: `.on_tx(move |tx, r| Box::pin(grade(emitter.clone(), tx, r)))`.
    pub fn on_tx_fn<E, F>(self, handler: F) -> Self
    where
        E: DomainEvent,
        F: for<'c> TxHandlerFn<'c, E>,
    {
        self.on_tx::<E, _>(move |tx, received| Box::pin(handler.call(tx, received)))
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
        check_group(&group)?;
        let routes = Routes::new(&group, routes)?;
        settings.validate()?;
        inbox::check_migrated(&inner.pool).await?;

        let multi_filter = server_at_least(&inner.nats, 2, 10);
        let prefix = &inner.config.subject_prefix;
        let config = consumer_config(&group, &settings, prefix, routes.filters(), multi_filter);
        let (nats, consumer) = attach(&inner, &group, config.clone()).await?;

        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let ctx = Arc::new(Ctx {
            inner,
            group: group.clone(),
            settings,
            stats: stats.clone(),
            #[cfg(feature = "test-hooks")]
            crash: tokio::sync::Notify::new(),
            queued: Mutex::new(BTreeSet::new()),
            failure: Arc::new(tokio::sync::watch::Sender::new(None)),
            metrics: Arc::new(ConsumerMetrics::new(&group, routes.names())),
            routes,
            nats,
            carry: Mutex::new(None),
        });
        let instance = Instance::start(ctx, consumer).await?;
        let failure = instance.ctx.failure.subscribe();
        tracing::info!(group = %group, "consumer started");
        let task = tokio::spawn(instance::run(instance, config, stop_rx).instrument(
            tracing::info_span!(
                "edupulse.consumer",
                group = %group
            ),
        ));
        Ok(ConsumerHandle {
            group,
            stop,
            task,
            stats,
            failure,
        })
    }
}

/// Checks that `group` can be a JetStream durable name.
fn check_group(group: &str) -> Result<(), ConsumerError> {
    if group.is_empty()
        || group.len() > MAX_GROUP_LEN
        || !group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ConsumerError::InvalidGroup(group.to_owned()));
    }
    Ok(())
}

/// The durable consumer of `group`, reading the subjects of `filters` (relative to
/// `prefix`). Several filters need a server that takes them (2.10 or later,
/// `multi_filter`) and filters that do not overlap; otherwise the consumer reads the
/// whole prefix and the lanes skip what is not the group's.
fn consumer_config(
    group: &str,
    settings: &ConsumerSettings,
    prefix: &str,
    filters: &[String],
    multi_filter: bool,
) -> pull::Config {
    let full: Vec<String> = filters.iter().map(|f| format!("{prefix}.{f}")).collect();
    let mut config = pull::Config {
        durable_name: Some(group.to_owned()),
        description: Some(format!("edupulse-events consumer group {group}")),
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        // Handler failures are counted and dead-lettered in the lanes. The server's
        // bound is for a message the client cannot read at all: past it the server
        // gives up, and the group records it from its advisory (`undeliverable`).
        max_deliver: i64::from(settings.max_redeliveries),
        max_ack_pending: settings.max_ack_pending(),
        deliver_policy: settings.start_from.deliver_policy(),
        ..Default::default()
    };
    if full.len() == 1 {
        config.filter_subject = full[0].clone();
    } else if multi_filter && !any_overlap(filters) {
        config.filter_subjects = full;
    } else {
        // Servers before 2.10 take one filter: read the prefix, skip what is not ours.
        config.filter_subject = format!("{prefix}.>");
    }
    config
}

/// Opens a connection of the group's own (a message the client cannot read drops the
/// connection it arrives on, and must not take the relay's with it) and creates the
/// durable consumer on it, or updates it to `config`.
pub(super) async fn attach(
    inner: &Inner,
    group: &str,
    config: pull::Config,
) -> Result<(async_nats::Client, PullConsumer), ConsumerError> {
    let nats = crate::service::nats::connect(&inner.config)
        .await
        .map_err(|e| ConsumerError::JetStream {
            group: group.to_owned(),
            stream: inner.config.stream.clone(),
            reason: e.to_string(),
        })?;
    let consumer = create_durable(inner, &nats, group, config).await?;
    Ok((nats, consumer))
}

/// Creates the durable consumer, or updates it to `config`.
async fn create_durable(
    inner: &Inner,
    nats: &async_nats::Client,
    group: &str,
    config: pull::Config,
) -> Result<PullConsumer, ConsumerError> {
    let js_error = |reason: String| ConsumerError::JetStream {
        group: group.to_owned(),
        stream: inner.config.stream.clone(),
        reason,
    };
    let stream = async_nats::jetstream::new(nats.clone())
        .get_stream(&inner.config.stream)
        .await
        .map_err(|e| js_error(e.to_string()))?;
    stream
        .create_consumer(config)
        .await
        .map_err(|e| js_error(e.to_string()))
}

/// Whether the NATS server is at least version `major.minor`.
fn server_at_least(client: &async_nats::Client, major: u32, minor: u32) -> bool {
    version_at_least(&client.server_info().version, major, minor)
}

/// Whether `version` (`2.10.4`, `2.11.0-beta.1`) is at least `major.minor`; what does
/// not parse counts as 0.
fn version_at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// A function that handles an event of type `E` in the transaction `&'c mut
/// PgConnection` and returns a future borrowing it: what an `async fn(&mut
/// PgConnection, Received<E>) -> Result<(), HandlerError>` is. Implemented for every
/// such function; see [`ConsumerBuilder::on_tx_fn`].
pub trait TxHandlerFn<'c, E>: Send + Sync + 'static {
    /// The handler's future.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'c;

    /// Calls the handler.
    fn call(&self, tx: &'c mut PgConnection, received: Received<E>) -> Self::Future;
}

impl<'c, E, F, Fut> TxHandlerFn<'c, E> for F
where
    E: 'c,
    F: Fn(&'c mut PgConnection, Received<E>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'c,
{
    type Future = Fut;

    fn call(&self, tx: &'c mut PgConnection, received: Received<E>) -> Fut {
        self(tx, received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::consumer::DeliverPolicy;
    use std::time::Duration;

    fn filters(filters: &[&str]) -> Vec<String> {
        filters.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn a_group_name_is_a_durable_name() {
        for good in ["grading", "a", "Grade_2-b", &"x".repeat(MAX_GROUP_LEN)] {
            assert!(check_group(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a.b",
            "a*",
            "a>",
            "é",
            &"x".repeat(MAX_GROUP_LEN + 1),
        ] {
            assert!(
                matches!(check_group(bad), Err(ConsumerError::InvalidGroup(g)) if g == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_durable_consumer_takes_the_settings() {
        let settings = ConsumerSettings {
            concurrency: 2,
            fetch_batch: 10,
            ack_wait: Duration::from_secs(7),
            start_from: crate::StartFrom::New,
            ..ConsumerSettings::default()
        };
        let config = consumer_config("grading", &settings, "p", &filters(&["a.b"]), true);
        assert_eq!(config.durable_name.as_deref(), Some("grading"));
        assert_eq!(
            config.description.as_deref(),
            Some("edupulse-events consumer group grading")
        );
        assert_eq!(config.ack_policy, AckPolicy::Explicit);
        assert_eq!(config.ack_wait, Duration::from_secs(7));
        assert_eq!(
            config.max_deliver, 20,
            "the server-side bound: max_redeliveries"
        );
        assert_eq!(config.max_ack_pending, 40);
        assert_eq!(config.deliver_policy, DeliverPolicy::New);
    }

    #[test]
    fn one_filter_is_the_filter_subject() {
        for multi_filter in [true, false] {
            let config = consumer_config(
                "g",
                &ConsumerSettings::default(),
                "p",
                &filters(&["quiz.*.submitted"]),
                multi_filter,
            );
            assert_eq!(config.filter_subject, "p.quiz.*.submitted");
            assert!(config.filter_subjects.is_empty());
        }
    }

    #[test]
    fn several_filters_need_a_new_server_and_no_overlap_else_the_prefix() {
        let settings = ConsumerSettings::default();
        let apart = filters(&["lesson.published", "quiz.*.submitted"]);
        let config = consumer_config("g", &settings, "p", &apart, true);
        assert_eq!(config.filter_subject, "");
        assert_eq!(
            config.filter_subjects,
            ["p.lesson.published", "p.quiz.*.submitted"]
        );

        let old_server = consumer_config("g", &settings, "p", &apart, false);
        assert_eq!(old_server.filter_subject, "p.>");
        assert!(old_server.filter_subjects.is_empty());

        let overlapping = filters(&["quiz.*.submitted", "quiz.q1.*"]);
        let config = consumer_config("g", &settings, "p", &overlapping, true);
        assert_eq!(config.filter_subject, "p.>");
        assert!(config.filter_subjects.is_empty());
    }

    #[test]
    fn server_versions_compare_by_major_and_minor() {
        assert!(version_at_least("2.10.0", 2, 10));
        assert!(version_at_least("2.10.22", 2, 10));
        assert!(version_at_least("2.11.0-beta.1", 2, 10));
        assert!(version_at_least("3.0.0", 2, 10));
        assert!(!version_at_least("2.9.25", 2, 10));
        assert!(!version_at_least("2.1", 2, 10));
        assert!(!version_at_least("", 2, 10));
        assert!(!version_at_least("v2.10.0", 2, 10));
    }
}
