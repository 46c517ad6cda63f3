//! [`EventService`]: the connection to Postgres and NATS that emits events and runs the
//! relay.

use crate::config::{redact_text, Config, NatsAuth};
use crate::migrate::{migrator, MigrateError};
use crate::registry::{registry, RegistryError};
use async_nats::jetstream::{self, context::CreateStreamErrorKind, stream, ErrorCode};
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
#[derive(Debug, thiserror::Error)]
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
            ConnectError::JetStream { .. } => ConnectErrorKind::JetStream,
            ConnectError::StreamConflict { .. } => ConnectErrorKind::StreamConflict,
        }
    }
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

        let pg_error = |error: &dyn fmt::Display| ConnectError::Postgres {
            target: config.database_url_redacted(),
            reason: redact_text(&error.to_string(), &config.database_url),
        };
        let pg_options: PgConnectOptions = config
            .database_url
            .parse()
            .map_err(|e: sqlx::Error| pg_error(&e))?;
        let pg_options = pg_options.application_name(&config.source);
        // One direct connection first: a pool only reports "timed out" when the server
        // refuses, while a connection says why.
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

        let nats = connect_nats(&config).await?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.relay.ack_timeout)
            .build(nats.clone());
        let stream_limit = ensure_stream(&config, &jetstream).await?;
        let mut max_message = nats.max_payload();
        if let Some(limit) = stream_limit {
            max_message = max_message.min(limit);
        }
        tracing::info!(
            nats = %config.nats_url_redacted(),
            stream = %config.stream,
            prefix = %config.subject_prefix,
            max_message,
            "edupulse event service connected"
        );
        Ok(EventService {
            inner: Arc::new(Inner {
                config,
                pool,
                pg_options,
                nats,
                jetstream,
                max_message,
            }),
        })
    }

    /// Applies the outbox migrations (schema `edupulse`, tracked in
    /// `edupulse._migrations`). Safe to call from several processes at once.
    ///
    /// # Errors
    /// [`MigrateError`] when a migration fails or the applied ones were changed.
    pub async fn migrate(&self) -> Result<(), MigrateError> {
        migrator().run(&self.inner.pool).await?;
        Ok(())
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

async fn connect_nats(config: &Config) -> Result<async_nats::Client, ConnectError> {
    let nats_error = |reason: String| ConnectError::Nats {
        target: config.nats_url_redacted(),
        reason: redact_text(&reason, &config.nats_url),
    };
    let mut options = match &config.nats_auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::UserPassword { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
        NatsAuth::CredsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                nats_error(format!(
                    "cannot read credentials file {}: {e}",
                    path.display()
                ))
            })?,
    };
    let tls = &config.nats_tls;
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(roots) = &tls.root_certificates {
        options = options.add_root_certificates(roots.clone());
    }
    if let Some((cert, key)) = &tls.client_certificate {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let target = config.nats_url_redacted();
    options
        .connection_timeout(config.connect_timeout)
        .name(&config.source)
        .event_callback(move |event| {
            let target = target.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(nats = %target, "NATS connected")
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(nats = %target, "NATS disconnected; reconnecting")
                    }
                    other => tracing::debug!(nats = %target, event = %other, "NATS event"),
                }
            }
        })
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| nats_error(e.to_string()))
}

/// Makes sure the stream exists and captures `{prefix}.>`; returns its message size
/// limit, if it has one.
async fn ensure_stream(
    config: &Config,
    js: &jetstream::Context,
) -> Result<Option<usize>, ConnectError> {
    let subject = format!("{}.>", config.subject_prefix);
    let js_error = |reason: String| ConnectError::JetStream {
        target: config.nats_url_redacted(),
        reason,
    };
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        duplicate_window: config.duplicate_window,
        ..Default::default()
    };
    let existing = match js.get_stream(&config.stream).await {
        Ok(mut existing) => Some(
            existing
                .info()
                .await
                .map_err(|e| js_error(e.to_string()))?
                .config
                .clone(),
        ),
        Err(error) => match error.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(api)
                if api.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                None
            }
            _ => return Err(js_error(error.to_string())),
        },
    };
    let found = match existing {
        Some(found) => found,
        None => match js.create_stream(&wanted).await {
            Ok(mut created) => created
                .info()
                .await
                .map_err(|e| js_error(e.to_string()))?
                .config
                .clone(),
            Err(error) => {
                return Err(match error.kind() {
                    CreateStreamErrorKind::JetStream(api)
                        if api.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                    {
                        ConnectError::StreamConflict {
                            stream: config.stream.clone(),
                            differences: format!(
                                "another stream already captures subjects overlapping `{subject}`"
                            ),
                        }
                    }
                    _ => js_error(error.to_string()),
                })
            }
        },
    };
    let mut differences = Vec::new();
    if !found.subjects.contains(&subject) {
        differences.push(format!("it captures {:?}, not `{subject}`", found.subjects));
    }
    if found.duplicate_window != config.duplicate_window {
        differences.push(format!(
            "its duplicate window is {:?}, not {:?}",
            found.duplicate_window, config.duplicate_window
        ));
    }
    if found.retention != stream::RetentionPolicy::Limits {
        differences.push(format!(
            "its retention is {:?}; consumers need Limits",
            found.retention
        ));
    }
    if !differences.is_empty() {
        return Err(ConnectError::StreamConflict {
            stream: config.stream.clone(),
            differences: differences.join("; "),
        });
    }
    Ok(usize::try_from(found.max_message_size)
        .ok()
        .filter(|limit| *limit > 0))
}
