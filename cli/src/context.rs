//! The settings a command runs with, and its connections to Postgres and JetStream,
//! opened when a command first needs them.

use crate::error::{scrub, CliError};
use crate::Cli;
use edupulse_events::async_nats::jetstream::{self, context::GetStreamErrorKind, stream::Stream};
use edupulse_events::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use edupulse_events::sqlx::Connection;
use edupulse_events::{Config, Emitter};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::OnceCell;

/// How long connecting to either server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a command works with.
pub struct Ctx {
    /// The library's configuration (validates the URLs, prefix and stream; redacts).
    pub config: Config,
    database_url: String,
    nats_url: String,
    pool: OnceCell<PgPool>,
    jetstream: OnceCell<jetstream::Context>,
}

impl Ctx {
    /// Checks the global options.
    pub fn new(cli: &Cli) -> Result<Ctx, CliError> {
        let database_url = cli
            .database_url
            .clone()
            .filter(|url| !url.is_empty())
            .ok_or(CliError::MissingDatabaseUrl)?;
        let config = Config::builder(&database_url)
            .nats_url(&cli.nats_url)
            .subject_prefix(&cli.prefix)
            .stream(&cli.stream)
            .build()?;
        Ok(Ctx {
            config,
            database_url,
            nats_url: cli.nats_url.clone(),
            pool: OnceCell::new(),
            jetstream: OnceCell::new(),
        })
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        self.config.stream()
    }

    /// A pool of (at most two) Postgres connections.
    pub async fn pool(&self) -> Result<&PgPool, CliError> {
        self.pool
            .get_or_try_init(|| async {
                let failed = |reason: String| CliError::PostgresConnect {
                    target: self.config.database_url_redacted(),
                    reason: scrub(&reason, &[&self.database_url]),
                };
                let options = PgConnectOptions::from_str(&self.database_url)
                    .map_err(|error| failed(error.to_string()))?
                    .application_name("edupulse-cli");
                // One connection first, so that the error says why (a pool would only
                // say that it timed out).
                let first =
                    tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
                        .await
                        .map_err(|_| failed("timed out".to_owned()))?
                        .map_err(|error| failed(error.to_string()))?;
                let _ = first.close().await;
                PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(|error| failed(error.to_string()))
            })
            .await
    }

    /// The library's Postgres-only handle, for its outbox calls.
    pub async fn emitter(&self) -> Result<Emitter, CliError> {
        Ok(Emitter::from_pool(
            self.pool().await?.clone(),
            self.config.clone(),
        ))
    }

    /// A JetStream context.
    pub async fn jetstream(&self) -> Result<&jetstream::Context, CliError> {
        self.jetstream
            .get_or_try_init(|| async {
                let seeds: Vec<&str> = self.nats_url.split(',').map(str::trim).collect();
                let failed = |reason: String| CliError::NatsConnect {
                    target: self.config.nats_url_redacted(),
                    reason: scrub(&reason, &[&self.nats_url]),
                };
                let connect = edupulse_events::async_nats::ConnectOptions::new()
                    .connection_timeout(CONNECT_TIMEOUT)
                    .connect(seeds);
                let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, connect)
                    .await
                    .map_err(|_| failed("timed out".to_owned()))?
                    .map_err(|error| failed(error.to_string()))?;
                Ok(jetstream::new(client))
            })
            .await
    }

    /// The service's stream.
    pub async fn stream(&self) -> Result<Stream, CliError> {
        let js = self.jetstream().await?;
        js.get_stream(self.stream_name()).await.map_err(|error| {
            if let GetStreamErrorKind::JetStream(api) = error.kind() {
                if api.error_code()
                    == edupulse_events::async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                {
                    return CliError::NoStream(self.stream_name().to_owned());
                }
            }
            CliError::JetStream(scrub(&error.to_string(), &[&self.nats_url]))
        })
    }

    /// A JetStream error, credentials removed.
    pub fn js_error(&self, error: impl std::fmt::Display) -> CliError {
        CliError::JetStream(scrub(&error.to_string(), &[&self.nats_url]))
    }
}
