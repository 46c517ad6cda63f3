//! [`EventService`]: the connection to Postgres and NATS that emits events and runs the
//! relay.

pub(crate) mod nats;
mod stream;

pub(crate) use stream::offers_atomic;

use crate::config::{redact_text, Config};
use crate::migrate::MigrateError;
use crate::outbox::Emitter;
use crate::registry::{registry, RegistryError};
use async_nats::jetstream;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use std::fmt;
use std::sync::Arc;

/// Emits events into the outbox and runs the relay; cheap to clone.
#[derive(Clone)]
pub struct EventService {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: Config,
    pub pool: PgPool,
    pub pg_options: PgConnectOptions,
    pub nats: async_nats::Client,
    pub jetstream: jetstream::Context,
    /// The largest message (headers and body) that NATS and the stream accept.
    pub max_message: usize,
    /// Whether the relay may publish atomic batches: wanted, and offered by the server
    /// at connect (see [`AtomicBatches`](crate::AtomicBatches)).
    pub atomic: bool,
    /// Writes into the outbox (the same pool and config).
    pub emitter: Emitter,
}

impl fmt::Debug for EventService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventService")
            .field("config", &self.inner.config)
            .field("max_message", &self.inner.max_message)
            .finish_non_exhaustive()
    }
}

/// What kind of failure a [`ConnectError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// Two event types share a name.
    Registry,
    /// Postgres did not answer or refused the connection.
    Postgres,
    /// NATS did not answer or refused the connection.
    Nats,
    /// NATS answered but JetStream is off or failed.
    JetStream,
    /// The stream exists with settings that conflict with the configuration.
    StreamConflict,
}

/// [`EventService::connect`] failed; nothing was started.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Two event types share a name; fix the names before the service can run.
    #[error("the event registry is invalid: {0}")]
    Registry(#[from] RegistryError),
    /// Postgres did not answer or refused the connection.
    #[error("cannot connect to Postgres at {target}: {reason}; check that Postgres runs there and that DATABASE_URL is right")]
    Postgres {
        /// The database URL, credentials redacted.
        target: String,
        /// What failed, credentials redacted.
        reason: String,
    },
    /// NATS did not answer or refused the connection.
    #[error("cannot connect to NATS at {target}: {reason}; check that nats-server runs there (with -js) and that NATS_URL and the credentials are right")]
    Nats {
        /// The NATS URL, credentials redacted.
        target: String,
        /// What failed, credentials redacted.
        reason: String,
    },
    /// NATS answered, but JetStream could not be used.
    #[error(
        "JetStream at {target} failed: {reason}; run nats-server with JetStream enabled (-js)"
    )]
    JetStream {
        /// The NATS URL, credentials redacted.
        target: String,
        /// What failed.
        reason: String,
    },
    /// The server lacks a feature the configuration asks for.
    #[error("nats-server {version} at {target} has no {feature}, which needs nats-server {needs} or later; upgrade the server or {instead}")]
    ServerTooOld {
        /// The NATS URL, credentials redacted.
        target: String,
        /// The version the server reports.
        version: String,
        /// The feature.
        feature: &'static str,
        /// The first version that has it.
        needs: &'static str,
        /// The setting to change instead.
        instead: &'static str,
    },
    /// The stream exists with settings that conflict with this configuration.
    #[error("stream {stream} conflicts with this service's configuration: {differences}; change the stream with `nats stream edit`, delete it, or configure another stream name")]
    StreamConflict {
        /// The stream's name.
        stream: String,
        /// What differs.
        differences: String,
    },
}

impl ConnectError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ConnectErrorKind {
        match self {
            ConnectError::Registry(_) => ConnectErrorKind::Registry,
            ConnectError::Postgres { .. } => ConnectErrorKind::Postgres,
            ConnectError::Nats { .. } => ConnectErrorKind::Nats,
            ConnectError::JetStream { .. } | ConnectError::ServerTooOld { .. } => {
                ConnectErrorKind::JetStream
            }
            ConnectError::StreamConflict { .. } => ConnectErrorKind::StreamConflict,
        }
    }
}

/// Connects to Postgres: one direct connection first (a pool only reports "timed out"
/// when the server refuses, while a connection says why), then the pool.
pub(crate) async fn connect_postgres(
    config: &Config,
) -> Result<(PgPool, PgConnectOptions), ConnectError> {
    let pg_error = |error: &dyn fmt::Display| ConnectError::Postgres {
        target: config.database_url_redacted(),
        reason: redact_text(&error.to_string(), &config.database_url),
    };
    let pg_options: PgConnectOptions = config
        .database_url
        .parse()
        .map_err(|e: sqlx::Error| pg_error(&e))?;
    let pg_options = pg_options.application_name(&config.source);
    let probe = tokio::time::timeout(
        config.connect_timeout,
        PgConnection::connect_with(&pg_options),
    )
    .await
    .map_err(|_| pg_error(&format!("no answer within {:?}", config.connect_timeout)))?
    .map_err(|e| pg_error(&e))?;
    let _ = probe.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_with(pg_options.clone())
        .await
        .map_err(|e| pg_error(&e))?;
    Ok((pool, pg_options))
}

impl EventService {
    /// Validates the registry, connects to Postgres and NATS, and makes sure the stream
    /// that captures `{prefix}.>` exists with the configured duplicate window.
    ///
    /// It does not migrate: call [`EventService::migrate`] once at start-up (it is cheap
    /// when nothing is new).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = edupulse_events::Config::from_env()?;
    /// let service = edupulse_events::EventService::connect(config).await?;
    /// service.migrate().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ConnectError`], whose [`kind`](ConnectError::kind) tells which part failed.
    pub async fn connect(config: Config) -> Result<EventService, ConnectError> {
        registry().validate()?;

        let (pool, pg_options) = connect_postgres(&config).await?;
        let nats = nats::connect(&config).await?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.relay.ack_timeout)
            .build(nats.clone());
        let stream = stream::ensure(&config, &jetstream).await?;
        let mut max_message = nats.max_payload();
        if let Some(limit) = stream.max_message {
            max_message = max_message.min(limit);
        }
        tracing::info!(
            nats = %config.nats_url_redacted(),
            stream = %config.stream,
            prefix = %config.subject_prefix,
            max_message,
            atomic_batches = stream.atomic,
            "edupulse event service connected"
        );
        let emitter = Emitter::new(config.clone(), pool.clone(), max_message);
        Ok(EventService {
            inner: Arc::new(Inner {
                emitter,
                config,
                pool,
                pg_options,
                nats,
                jetstream,
                max_message,
                atomic: stream.atomic,
            }),
        })
    }

    /// Applies the outbox migrations (schema `edupulse`, tracked in
    /// `edupulse._migrations`). Safe to call from several processes at once. When every
    /// migration is applied already it only reads `edupulse._migrations`, so a role
    /// without the right to create tables may call it at every start (see
    /// [`grants_sql`](crate::grants_sql)).
    ///
    /// # Errors
    /// [`MigrateError`] when a migration fails or the applied ones were changed.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        crate::migrate::run(&self.inner.pool).await
    }

    /// The service's Postgres pool, for the application's own queries and transactions.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The NATS client.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The full subject an event with relative subject `subject` is published to.
    pub fn full_subject(&self, subject: &str) -> String {
        format!("{}.{subject}", self.inner.config.subject_prefix)
    }

    /// The largest encoded event (headers and JSON body) that can be emitted.
    pub fn max_message_size(&self) -> usize {
        self.inner.max_message
    }
}

crate::support::debug_as_display!(ConnectError);
