//! Connecting to NATS with the configured credentials and TLS, logging connection
//! events without credentials.

use super::ConnectError;
use crate::config::{
    nats_seeds, redact_text, split_nats_credentials, Config, NatsAuth, UrlCredentials,
};

pub(crate) async fn connect(config: &Config) -> Result<async_nats::Client, ConnectError> {
    let nats_error = |reason: String| ConnectError::Nats {
        target: config.nats_url_redacted(),
        reason: redact_text(&reason, &config.nats_url),
    };
    // Credentials written in the URL reach the client as options, never inside an
    // address it may log (async-nats logs server addresses at debug level).
    let (_, url_credentials) = split_nats_credentials(&config.nats_url);
    // Several seeds: the client connects to one of them and moves to another when it
    // is lost (or frozen: see `ping_interval`).
    let seeds = nats_seeds(&config.nats_url).map_err(nats_error)?;
    let mut options = match &config.nats_auth {
        NatsAuth::None => match url_credentials {
            None => async_nats::ConnectOptions::new(),
            Some(UrlCredentials::UserPassword { user, password }) => {
                async_nats::ConnectOptions::with_user_and_password(user, password)
            }
            Some(UrlCredentials::Token(token)) => async_nats::ConnectOptions::with_token(token),
        },
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
        .ping_interval(config.nats_ping_interval)
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
        .connect(seeds)
        .await
        .map_err(|e| nats_error(e.to_string()))
}

/// How long a client's JetStream calls must keep failing on an open connection before
/// the client is moved to another server (at most this often, too).
pub(crate) const MOVE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Moves a client off a server that stays connected but cannot reach JetStream: a node
/// cut off from the rest of its cluster (a minority partition), or one whose routes do
/// not come back. The client only moves by itself when its connection drops or goes
/// silent (pings); here every request fails or times out while pings are answered.
/// A step of a long loop: [`Mover::failed`] after each failure, [`Mover::ok`] after a
/// success.
#[derive(Debug, Default)]
pub(crate) struct Mover {
    /// Since when every call has failed.
    failing_since: Option<tokio::time::Instant>,
    /// When the client was last told to move.
    moved_at: Option<tokio::time::Instant>,
}

impl Mover {
    /// A call went through: the server is fine.
    pub fn ok(&mut self) {
        self.failing_since = None;
    }

    /// A call failed. After [`MOVE_AFTER`] of failures (and no move in the last
    /// [`MOVE_AFTER`]), tells the client to reconnect, to another server of its pool
    /// when it has more than one (it picks one at random; a wrong pick fails again and
    /// moves again). Returns whether it did.
    pub async fn failed(&mut self, client: &async_nats::Client, what: &str) -> bool {
        let now = tokio::time::Instant::now();
        let since = *self.failing_since.get_or_insert(now);
        let quiet = self
            .moved_at
            .is_none_or(|at| now.duration_since(at) >= MOVE_AFTER);
        if now.duration_since(since) < MOVE_AFTER || !quiet {
            return false;
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            // It is moving already.
            return false;
        }
        match client.server_pool().await {
            Ok(pool) if pool.len() > 1 => {}
            _ => return false,
        }
        self.moved_at = Some(now);
        tracing::warn!(
            failing_for = ?now.duration_since(since),
            "{what} has failed on this NATS server for a while although the connection \
             is up (a node cut off from its cluster?); moving to another server"
        );
        client.force_reconnect().await.is_ok()
    }
}
