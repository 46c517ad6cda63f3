//! What can go wrong in a command, each said in one line with what to do.

use edupulse_events::{ConfigError, MigrateError, OutboxError};

/// A command failed; `main` prints it on one line and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No database URL was given.
    #[error("no database URL: pass --database-url or set DATABASE_URL, e.g. postgres://user@127.0.0.1:5432/app")]
    MissingDatabaseUrl,
    /// A setting is invalid (the library's message, credentials redacted).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Postgres could not be reached.
    #[error("cannot connect to Postgres at {target}: {reason}; check that Postgres runs there and that --database-url (DATABASE_URL) is right")]
    PostgresConnect {
        /// The URL, credentials redacted.
        target: String,
        /// What the driver said, credentials removed.
        reason: String,
    },
    /// A query failed.
    #[error("a query failed: {0}; check that Postgres answers and that the role may read the edupulse schema (see grants_sql())")]
    Query(String),
    /// The edupulse tables are not there.
    #[error("the edupulse tables (schema edupulse) do not exist in this database; run `edupulse migrate` or start the service once")]
    NotMigrated,
    /// NATS could not be reached.
    #[error("cannot connect to NATS at {target}: {reason}; check that nats-server runs there (with -js) and that --nats-url (NATS_URL) is right")]
    NatsConnect {
        /// The URL, credentials redacted.
        target: String,
        /// What the client said, credentials removed.
        reason: String,
    },
    /// The stream does not exist.
    #[error("stream {0} does not exist on this NATS server; start the service once (it creates the stream) or pass --stream")]
    NoStream(String),
    /// A JetStream request failed.
    #[error("JetStream request failed: {0}; check that JetStream is enabled and the stream name (--stream) is right")]
    JetStream(String),
    /// Migrating failed.
    #[error("{0}")]
    Migrate(String),
    /// A health check found a problem.
    #[error("check failed: {0}")]
    CheckFailed(String),
    /// Output could not be written or encoded.
    #[error("cannot write the output: {0}")]
    Output(String),
}

impl From<OutboxError> for CliError {
    fn from(error: OutboxError) -> Self {
        match error {
            OutboxError::NotMigrated => CliError::NotMigrated,
            other => CliError::Query(other.to_string()),
        }
    }
}

impl From<MigrateError> for CliError {
    fn from(error: MigrateError) -> Self {
        CliError::Migrate(error.to_string())
    }
}

impl From<edupulse_events::sqlx::Error> for CliError {
    fn from(error: edupulse_events::sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            // undefined_table, invalid_schema_name
            if matches!(db.code().as_deref(), Some("42P01") | Some("3F000")) {
                return CliError::NotMigrated;
            }
        }
        CliError::Query(error.to_string())
    }
}

impl From<serde_json::Error> for CliError {
    fn from(error: serde_json::Error) -> Self {
        CliError::Output(error.to_string())
    }
}

/// The secrets in a URL's user part: the password of `scheme://user:password@host`,
/// or the token of `scheme://token@host` (NATS). Several URLs may be comma-separated.
pub fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    for part in url.split(',') {
        let Some((_, rest)) = part.split_once("://") else {
            continue;
        };
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let Some((userinfo, _)) = authority.rsplit_once('@') else {
            continue;
        };
        let secret = match userinfo.split_once(':') {
            Some((_, password)) => password,
            None if part.trim_start().starts_with("nats") => userinfo,
            None => "",
        };
        if !secret.is_empty() {
            secrets.push(secret.to_owned());
        }
    }
    secrets
}

/// `text` with every secret of `urls` replaced by `<redacted>`.
pub fn scrub(text: &str, urls: &[&str]) -> String {
    let mut out = text.to_owned();
    for url in urls {
        for secret in secrets_of(url) {
            out = out.replace(&secret, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_passwords_and_tokens() {
        assert_eq!(
            secrets_of("postgres://app:s3cret@db:5432/app"),
            vec!["s3cret"]
        );
        assert_eq!(
            secrets_of("nats://tok@n1:4222,nats://u:pw@n2"),
            vec!["tok", "pw"]
        );
        assert!(secrets_of("postgres://app@db/app").is_empty());
        assert!(secrets_of("nats://127.0.0.1:4222").is_empty());
    }

    #[test]
    fn scrub_removes_every_secret() {
        let text = "failed for postgres://app:s3cret@db/app (s3cret)";
        let clean = scrub(text, &["postgres://app:s3cret@db/app"]);
        assert!(!clean.contains("s3cret"), "{clean}");
    }
}
