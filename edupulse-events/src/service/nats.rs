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
