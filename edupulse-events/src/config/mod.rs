//! Settings of an [`EventService`](crate::EventService): from the environment with
//! [`Config::from_env`], or in code with [`Config::builder`].

mod redact;

pub(crate) use redact::{redact_text, redact_url, split_nats_credentials, UrlCredentials};

use crate::relay::RelaySettings;
use crate::support::range::check_duration;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The NATS address used when none is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The subject prefix used when none is given: events go to `edupulse.{subject}`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "edupulse";
/// The JetStream stream used when none is given.
pub const DEFAULT_STREAM: &str = "EDUPULSE";
/// The CloudEvents `source` used when none is given.
pub const DEFAULT_SOURCE: &str = "edupulse-events";

/// How to authenticate to NATS.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsAuth {
    /// No credentials (or credentials in the URL).
    #[default]
    None,
    /// User and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password; never shown by `Debug`.
        password: String,
    },
    /// A token; never shown by `Debug`.
    Token(String),
    /// A `.creds` file (JWT and NKey seed).
    CredsFile(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            NatsAuth::Token(_) => f.write_str("Token(<redacted>)"),
            NatsAuth::CredsFile(path) => f.debug_tuple("CredsFile").field(path).finish(),
        }
    }
}

/// TLS settings for the NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// A PEM file of root certificates to trust.
    pub root_certificates: Option<PathBuf>,
    /// A client certificate and its key (PEM files), for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// Where JetStream places the stream's replicas: a cluster of a super-cluster, and
/// server tags every replica's server must have. Default: anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPlacement {
    /// The cluster (by name) the stream must live in.
    pub cluster: Option<String>,
    /// Tags each server holding a replica must carry (`server_tags` in its config).
    pub tags: Vec<String>,
}

/// The most replicas a JetStream stream can have.
pub const MAX_STREAM_REPLICAS: usize = 5;

/// Everything an [`EventService`](crate::EventService) needs to run.
///
/// `Debug` never shows a password or token: credentials in URLs are replaced by
/// `<redacted>`.
#[derive(Clone)]
pub struct Config {
    pub(crate) database_url: String,
    pub(crate) nats_url: String,
    pub(crate) nats_auth: NatsAuth,
    pub(crate) nats_tls: NatsTls,
    pub(crate) subject_prefix: String,
    pub(crate) stream: String,
    pub(crate) source: String,
    pub(crate) duplicate_window: Duration,
    pub(crate) stream_replicas: usize,
    pub(crate) stream_placement: Option<StreamPlacement>,
    pub(crate) nats_ping_interval: Duration,
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) notify: bool,
    pub(crate) allow_lossy_stream: bool,
    pub(crate) relay: RelaySettings,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("nats_url", &redact_url(&self.nats_url))
            .field("nats_auth", &self.nats_auth)
            .field("nats_tls", &self.nats_tls)
            .field("subject_prefix", &self.subject_prefix)
            .field("stream", &self.stream)
            .field("source", &self.source)
            .field("duplicate_window", &self.duplicate_window)
            .field("stream_replicas", &self.stream_replicas)
            .field("stream_placement", &self.stream_placement)
            .field("nats_ping_interval", &self.nats_ping_interval)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("notify", &self.notify)
            .field("allow_lossy_stream", &self.allow_lossy_stream)
            .field("relay", &self.relay)
            .finish()
    }
}

/// A setting is missing or invalid.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `DATABASE_URL` is not set.
    #[error(
        "DATABASE_URL is not set; set it to your Postgres URL, e.g. \
         DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
    )]
    MissingDatabaseUrl,
    /// An environment variable is set but is not valid Unicode.
    #[error("environment variable {0} is not valid Unicode; set it to a plain string")]
    NotUnicode(&'static str),
    /// The database URL does not parse.
    #[error("database URL {url} is not a valid Postgres URL ({reason}); write it as postgres://user@host:5432/database")]
    InvalidDatabaseUrl {
        /// The URL, credentials redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The subject prefix is not one or more valid subject tokens.
    #[error("subject prefix {0:?} is invalid: {1}; use dot-separated tokens of letters, digits, `_` and `-`, e.g. `edupulse` or `acme.learning`")]
    InvalidSubjectPrefix(String, String),
    /// The stream name is not a valid JetStream stream name.
    #[error(
        "stream name {0:?} is invalid: {1}; use letters, digits, `_` and `-`, e.g. `EDUPULSE`"
    )]
    InvalidStream(String, String),
    /// The source is empty.
    #[error("event source is empty; set EDUPULSE_SOURCE or `source(...)` to your service's name, e.g. `grading-service`")]
    EmptySource,
    /// A number in the relay settings is out of range.
    #[error("{0}")]
    OutOfRange(String),
    /// A NATS server address does not parse.
    #[error("NATS URL {url} is invalid ({reason}); write one or more servers separated by commas, e.g. nats://n1:4222,nats://n2:4222")]
    InvalidNatsUrl {
        /// The URL, credentials redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Reads the settings from the environment:
    ///
    /// | variable | default |
    /// | --- | --- |
    /// | `DATABASE_URL` | required |
    /// | `NATS_URL` | `nats://127.0.0.1:4222` (several seeds: comma-separated) |
    /// | `EDUPULSE_SUBJECT_PREFIX` | `edupulse` |
    /// | `EDUPULSE_STREAM` | `EDUPULSE` |
    /// | `EDUPULSE_SOURCE` | `edupulse-events` |
    /// | `EDUPULSE_STREAM_REPLICAS` | `1` |
    ///
    /// # Errors
    /// [`ConfigError`] when `DATABASE_URL` is missing or a value is invalid; never panics.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(std::env::var)
    }

    /// Like [`Config::from_env`], reading variables through `lookup` (for tests and
    /// for settings kept elsewhere).
    ///
    /// # Errors
    /// As [`Config::from_env`].
    pub fn from_lookup(
        lookup: impl Fn(&'static str) -> Result<String, std::env::VarError>,
    ) -> Result<Config, ConfigError> {
        let get = |key: &'static str| match lookup(key) {
            Ok(value) if value.is_empty() => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::NotUnicode(key)),
        };
        let database_url = get("DATABASE_URL")?.ok_or(ConfigError::MissingDatabaseUrl)?;
        let mut builder = Config::builder(database_url);
        if let Some(url) = get("NATS_URL")? {
            builder = builder.nats_url(url);
        }
        if let Some(prefix) = get("EDUPULSE_SUBJECT_PREFIX")? {
            builder = builder.subject_prefix(prefix);
        }
        if let Some(stream) = get("EDUPULSE_STREAM")? {
            builder = builder.stream(stream);
        }
        if let Some(source) = get("EDUPULSE_SOURCE")? {
            builder = builder.source(source);
        }
        if let Some(replicas) = get("EDUPULSE_STREAM_REPLICAS")? {
            let replicas = replicas.trim().parse::<usize>().map_err(|_| {
                ConfigError::OutOfRange(format!(
                    "EDUPULSE_STREAM_REPLICAS {replicas:?} is not a number; use 1 to \
                     {MAX_STREAM_REPLICAS} (3 on a three-node cluster)"
                ))
            })?;
            builder = builder.stream_replicas(replicas);
        }
        builder.build()
    }

    /// Starts a configuration in code, with every default but the database URL.
    pub fn builder(database_url: impl Into<String>) -> ConfigBuilder {
        ConfigBuilder {
            config: Config {
                database_url: database_url.into(),
                nats_url: DEFAULT_NATS_URL.to_owned(),
                nats_auth: NatsAuth::None,
                nats_tls: NatsTls::default(),
                subject_prefix: DEFAULT_SUBJECT_PREFIX.to_owned(),
                stream: DEFAULT_STREAM.to_owned(),
                source: DEFAULT_SOURCE.to_owned(),
                duplicate_window: Duration::from_secs(120),
                stream_replicas: 1,
                stream_placement: None,
                nats_ping_interval: DEFAULT_NATS_PING_INTERVAL,
                max_connections: 10,
                connect_timeout: Duration::from_secs(5),
                notify: true,
                allow_lossy_stream: false,
                relay: RelaySettings::default(),
            },
        }
    }

    /// The subject prefix, e.g. `edupulse`.
    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The JetStream stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The CloudEvents source of emitted events.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The relay settings.
    pub fn relay(&self) -> &RelaySettings {
        &self.relay
    }

    /// How many servers hold a copy of the stream.
    pub fn stream_replicas(&self) -> usize {
        self.stream_replicas
    }

    /// The NATS URL, credentials redacted.
    pub fn nats_url_redacted(&self) -> String {
        redact_url(&self.nats_url)
    }

    /// The database URL, credentials redacted.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url)
    }
}

/// Builds a [`Config`] in code. Every setting has a default but the database URL.
///
/// ```
/// use edupulse_events::{Config, NatsAuth};
/// use std::time::Duration;
///
/// let config = Config::builder("postgres://app:secret@127.0.0.1/app")
///     .nats_url("nats://127.0.0.1:4222")
///     .nats_auth(NatsAuth::Token("s3cr3t".into()))
///     .subject_prefix("acme.learning")
///     .stream("ACME_LEARNING")
///     .source("grading-service")
///     .duplicate_window(Duration::from_secs(300))
///     .build()
///     .unwrap();
/// let shown = format!("{config:?}");
/// assert!(!shown.contains("secret") && !shown.contains("s3cr3t"));
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    config: Config,
}

impl ConfigBuilder {
    /// The NATS server URL, or a comma-separated list of them. Default
    /// `nats://127.0.0.1:4222`. Credentials written in it (`nats://user:password@host`,
    /// `nats://token@host`, percent-encoded where needed) are used unless
    /// [`nats_auth`](Self::nats_auth) is set; they are handed to the client apart from
    /// the address, and never shown.
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.config.nats_url = url.into();
        self
    }

    /// NATS credentials. Default none.
    pub fn nats_auth(mut self, auth: NatsAuth) -> Self {
        self.config.nats_auth = auth;
        self
    }

    /// NATS TLS settings. Default: TLS only if the server asks for it.
    pub fn nats_tls(mut self, tls: NatsTls) -> Self {
        self.config.nats_tls = tls;
        self
    }

    /// The prefix of every subject. Default `edupulse`.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.subject_prefix = prefix.into();
        self
    }

    /// The JetStream stream that captures `{prefix}.>`. Default `EDUPULSE`.
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.config.stream = stream.into();
        self
    }

    /// The CloudEvents `source` of this service's events. Default `edupulse-events`.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.config.source = source.into();
        self
    }

    /// The stream's duplicate window: a republished event id is dropped by JetStream
    /// within it. Default 2 minutes.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.config.duplicate_window = window;
        self
    }

    /// How many servers of a JetStream cluster hold a copy of the stream (its
    /// replicas, 1 to 5). Default 1; use 3 on a three-node cluster, so that the
    /// stream survives the loss of one node. `connect` creates the stream so, and
    /// refuses an existing stream with another count.
    pub fn stream_replicas(mut self, replicas: usize) -> Self {
        self.config.stream_replicas = replicas;
        self
    }

    /// Where the stream's replicas live (a cluster, server tags). Default: where
    /// JetStream chooses. Checked against an existing stream like the other settings.
    pub fn stream_placement(mut self, placement: StreamPlacement) -> Self {
        self.config.stream_placement = Some(placement);
        self
    }

    /// How often the NATS connections ping their server. A server that leaves two
    /// pings unanswered (paused, frozen, cut off) is left for another seed of the URL,
    /// so a frozen node costs about three intervals. Default 2 s.
    pub fn nats_ping_interval(mut self, interval: Duration) -> Self {
        self.config.nats_ping_interval = interval;
        self
    }

    /// The most Postgres connections the service's pool opens. Default 10.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.config.max_connections = max;
        self
    }

    /// How long connecting to Postgres or NATS may take. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Whether emitting notifies an idle relay at commit (`pg_notify`). Default true;
    /// without it the relay finds events within its poll interval.
    pub fn notify(mut self, notify: bool) -> Self {
        self.config.notify = notify;
        self
    }

    /// Whether to accept an existing stream that can drop events before consumers read
    /// them: memory storage, `max_age`, or `max_msgs`/`max_bytes`/`max_msgs_per_subject`
    /// with discard old. Default false: [`EventService::connect`](crate::EventService::connect)
    /// refuses such a stream, saying what it would drop. Accept it only if every
    /// consumer group always reads within those limits.
    pub fn allow_lossy_stream(mut self, allow: bool) -> Self {
        self.config.allow_lossy_stream = allow;
        self
    }

    /// The relay settings. Default [`RelaySettings::default`].
    pub fn relay(mut self, relay: RelaySettings) -> Self {
        self.config.relay = relay;
        self
    }

    /// Checks the settings and returns the configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid setting.
    pub fn build(self) -> Result<Config, ConfigError> {
        let config = self.config;
        if !(config.database_url.starts_with("postgres://")
            || config.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::InvalidDatabaseUrl {
                url: redact_url(&config.database_url),
                reason: "it does not start with postgres:// or postgresql://".to_owned(),
            });
        }
        if let Err(error) = config
            .database_url
            .parse::<sqlx::postgres::PgConnectOptions>()
        {
            return Err(ConfigError::InvalidDatabaseUrl {
                url: redact_url(&config.database_url),
                reason: redact_text(&error.to_string(), &config.database_url),
            });
        }
        check_prefix(&config.subject_prefix)
            .map_err(|why| ConfigError::InvalidSubjectPrefix(config.subject_prefix.clone(), why))?;
        check_stream(&config.stream)
            .map_err(|why| ConfigError::InvalidStream(config.stream.clone(), why))?;
        if config.source.trim().is_empty() {
            return Err(ConfigError::EmptySource);
        }
        if config.source.chars().any(char::is_control) {
            return Err(ConfigError::OutOfRange(
                "event source contains a control character; use a plain name such as \
                 `grading-service`"
                    .to_owned(),
            ));
        }
        config.relay.check().map_err(ConfigError::OutOfRange)?;
        if config.duplicate_window.is_zero() {
            return Err(ConfigError::OutOfRange(
                "duplicate_window is zero; JetStream's de-duplication is what publishes each \
                 event once: give it at least a few seconds (default 2 minutes)"
                    .to_owned(),
            ));
        }
        check_duration("duplicate_window", config.duplicate_window, None)
            .and_then(|()| check_duration("connect_timeout", config.connect_timeout, None))
            .and_then(|()| check_duration("nats_ping_interval", config.nats_ping_interval, None))
            .map_err(ConfigError::OutOfRange)?;
        if config.nats_ping_interval < Duration::from_millis(100) {
            return Err(ConfigError::OutOfRange(format!(
                "nats_ping_interval {:?} is too short; use at least 100 ms (default 2 s)",
                config.nats_ping_interval
            )));
        }
        if !(1..=MAX_STREAM_REPLICAS).contains(&config.stream_replicas) {
            return Err(ConfigError::OutOfRange(format!(
                "stream_replicas {} is out of range; use 1 to {MAX_STREAM_REPLICAS} (at most \
                 the number of JetStream servers; 3 on a three-node cluster)",
                config.stream_replicas
            )));
        }
        nats_seeds(&config.nats_url).map_err(|reason| ConfigError::InvalidNatsUrl {
            url: redact_url(&config.nats_url),
            reason: redact_text(&reason, &config.nats_url),
        })?;
        if config.max_connections < 2 {
            return Err(ConfigError::OutOfRange(format!(
                "max_connections {} is too small; the service needs at least 2 (one listens \
                 for notifications)",
                config.max_connections
            )));
        }
        Ok(config)
    }
}

/// The default of [`ConfigBuilder::nats_ping_interval`].
const DEFAULT_NATS_PING_INTERVAL: Duration = Duration::from_secs(2);

/// The server addresses of a NATS URL of one or more comma-separated seeds, credentials
/// taken out (see [`split_nats_credentials`]); the reason, credential-free, if one
/// does not parse.
pub(crate) fn nats_seeds(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let (servers, _) = split_nats_credentials(url);
    servers
        .split(',')
        .map(str::trim)
        .enumerate()
        .map(|(index, server)| {
            if server.is_empty() {
                return Err(format!("server {} of the list is empty", index + 1));
            }
            server
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("server {} ({server}): {e}", index + 1))
        })
        .collect()
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.starts_with('$') {
        return Err("it starts with `$`, which NATS reserves".to_owned());
    }
    crate::subject::check_subject(prefix)
        .map_err(|(token, problem)| format!("token {token:?}: {problem}"))
}

fn check_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty() {
        return Err("it is empty".to_owned());
    }
    if stream.len() > 255 {
        return Err("it is longer than 255 characters".to_owned());
    }
    if let Some(c) = stream
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!("it contains {c:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(
        vars: &'a [(&'static str, &'a str)],
    ) -> impl Fn(&'static str) -> Result<String, std::env::VarError> + 'a {
        move |key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
                .ok_or(std::env::VarError::NotPresent)
        }
    }

    #[test]
    fn several_nats_seeds_are_accepted_and_a_bad_one_is_named_without_secrets() {
        let config = Config::builder("postgres://u@h/db")
            .nats_url("nats://me:s3cret@n1:4222, nats://n2:4222,n3:4223")
            .build()
            .expect("three seeds");
        let seeds = nats_seeds(&config.nats_url).expect("seeds parse");
        assert_eq!(seeds.len(), 3);
        assert!(!format!("{seeds:?}").contains("s3cret"));
        let error = Config::builder("postgres://u@h/db")
            .nats_url("nats://me:s3cret@n1:4222,,nats://n2:notaport")
            .build()
            .expect_err("an empty seed");
        assert!(error.to_string().contains("server 2"), "{error}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
        let error = Config::builder("postgres://u@h/db")
            .nats_url("nats://me:s3cret@n1:4222,nats://n2:notaport")
            .build()
            .expect_err("a bad port");
        assert!(error.to_string().contains("server 2"), "{error}");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[test]
    fn stream_replicas_and_the_ping_interval_are_checked() {
        let build = |replicas: usize, ping: Duration| {
            Config::builder("postgres://u@h/db")
                .stream_replicas(replicas)
                .nats_ping_interval(ping)
                .build()
        };
        assert!(build(1, Duration::from_secs(2)).is_ok());
        assert!(build(5, Duration::from_millis(100)).is_ok());
        for (replicas, ping) in [
            (0, Duration::from_secs(2)),
            (6, Duration::from_secs(2)),
            (3, Duration::ZERO),
            (3, Duration::from_millis(99)),
            (3, Duration::MAX),
        ] {
            assert!(
                matches!(build(replicas, ping), Err(ConfigError::OutOfRange(_))),
                "{replicas} {ping:?}"
            );
        }
        let env = |key: &'static str| match key {
            "DATABASE_URL" => Ok("postgres://u@h/db".to_owned()),
            "EDUPULSE_STREAM_REPLICAS" => Ok("3".to_owned()),
            _ => Err(std::env::VarError::NotPresent),
        };
        assert_eq!(Config::from_lookup(env).unwrap().stream_replicas(), 3);
    }

    #[test]
    fn missing_database_url_is_an_error_value() {
        assert_eq!(
            Config::from_lookup(env(&[])).unwrap_err(),
            ConfigError::MissingDatabaseUrl
        );
        assert_eq!(
            Config::from_lookup(env(&[("DATABASE_URL", "")])).unwrap_err(),
            ConfigError::MissingDatabaseUrl
        );
        let message = ConfigError::MissingDatabaseUrl.to_string();
        assert!(message.contains("DATABASE_URL=postgres://"), "{message}");
    }

    #[test]
    fn env_defaults_and_overrides() {
        let config = Config::from_lookup(env(&[("DATABASE_URL", "postgres://u@h/db")])).unwrap();
        assert_eq!(config.nats_url, DEFAULT_NATS_URL);
        assert_eq!(config.subject_prefix, "edupulse");
        assert_eq!(config.stream, "EDUPULSE");
        assert_eq!(config.source, DEFAULT_SOURCE);

        let config = Config::from_lookup(env(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("NATS_URL", "nats://n:4223"),
            ("EDUPULSE_SUBJECT_PREFIX", "acme.learn"),
            ("EDUPULSE_STREAM", "ACME"),
            ("EDUPULSE_SOURCE", "grading"),
        ]))
        .unwrap();
        assert_eq!(config.nats_url, "nats://n:4223");
        assert_eq!(config.subject_prefix(), "acme.learn");
        assert_eq!(config.stream(), "ACME");
        assert_eq!(config.source(), "grading");
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = |b: ConfigBuilder| b.build().unwrap_err();
        let base = || Config::builder("postgres://u@h/db");
        assert!(matches!(
            bad(base().subject_prefix("a..b")),
            ConfigError::InvalidSubjectPrefix(..)
        ));
        assert!(matches!(
            bad(base().subject_prefix("a.*")),
            ConfigError::InvalidSubjectPrefix(..)
        ));
        assert!(matches!(
            bad(base().subject_prefix("$SYS")),
            ConfigError::InvalidSubjectPrefix(..)
        ));
        assert!(matches!(
            bad(base().stream("A.B")),
            ConfigError::InvalidStream(..)
        ));
        assert!(matches!(bad(base().source(" ")), ConfigError::EmptySource));
        assert!(matches!(
            bad(base().source("svc\r\nX: 1")),
            ConfigError::OutOfRange(_)
        ));
        assert!(matches!(
            bad(Config::builder("mysql://root:hunter2@h/db")),
            ConfigError::InvalidDatabaseUrl { .. }
        ));
        let shown = bad(Config::builder("mysql://root:hunter2@h/db")).to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(matches!(
            bad(base().relay(RelaySettings {
                batch_size: 0,
                ..RelaySettings::default()
            })),
            ConfigError::OutOfRange(_)
        ));
        assert!(matches!(
            bad(base().relay(RelaySettings {
                batch_bytes: 0,
                ..RelaySettings::default()
            })),
            ConfigError::OutOfRange(_)
        ));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let config = Config::builder("postgres://app:pg-secret@db:5432/app?password=pg-secret2")
            .nats_url("nats://me:nats-secret@n:4222")
            .nats_auth(NatsAuth::UserPassword {
                user: "me".into(),
                password: "auth-secret".into(),
            })
            .build()
            .unwrap();
        let shown = format!("{config:?} {config:#?}");
        for secret in ["pg-secret", "pg-secret2", "nats-secret", "auth-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("postgres://app:<redacted>@db:5432/app"),
            "{shown}"
        );
        let token = format!("{:?}", NatsAuth::Token("tok-secret".into()));
        assert!(!token.contains("tok-secret"));
        assert_eq!(
            redact_url("nats://tok-secret@h:4222"),
            "nats://<redacted>@h:4222"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("nats://a:p1@h1:4222,nats://b:secret-two@h2:4222"),
            "nats://a:<redacted>@h1:4222,nats://b:<redacted>@h2:4222"
        );
        assert_eq!(
            redact_url("wss://tok-secret@h:443"),
            "wss://<redacted>@h:443"
        );
        assert!(Config::builder("postgres://u@h/db")
            .duplicate_window(Duration::ZERO)
            .build()
            .is_err());
        assert_eq!(
            redact_text(
                "cannot connect to postgres://u:pw123@h/db as pw123",
                "postgres://u:pw123@h/db"
            ),
            "cannot connect to postgres://u:<redacted>@h/db as <redacted>"
        );
    }
}

crate::support::debug_as_display!(ConfigError);
