//! `edupulse`: the command line of edupulse-events. It reads and acts on what a
//! service keeps in Postgres (the outbox, the inboxes, the dead letters) and in
//! JetStream (the stream and its durable consumers), without the service's event types.

mod commands;
mod context;
mod error;
mod queries;

use clap::{ArgGroup, Parser, Subcommand};
use context::Ctx;
use edupulse_events::{DEFAULT_NATS_URL, DEFAULT_STREAM, DEFAULT_SUBJECT_PREFIX};
use error::CliError;
use std::process::ExitCode;
use std::time::Duration;

/// Operate an edupulse-events service: its outbox, relay, consumer groups and dead
/// letters. Exit codes: 0 success, 1 error (or a failed --check), 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "edupulse", version)]
pub struct Cli {
    /// The Postgres URL of the service's database.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// The NATS server URL (several: comma-separated).
    #[arg(long, env = "NATS_URL", global = true, default_value = DEFAULT_NATS_URL, hide_env_values = true)]
    nats_url: String,
    /// The JetStream stream the relay publishes to.
    #[arg(long, env = "EDUPULSE_STREAM", global = true, default_value = DEFAULT_STREAM, hide_env_values = true)]
    stream: String,
    /// The subject prefix of the service's events.
    #[arg(long, env = "EDUPULSE_SUBJECT_PREFIX", global = true, default_value = DEFAULT_SUBJECT_PREFIX, hide_env_values = true)]
    prefix: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Pending and dead events, the relay's leader, the published mark, the stream, and
    /// why the relay is behind when it is.
    Status {
        /// Exit 1 when anything is dead, or (with --max-age) the oldest pending event
        /// is older than the limit: for health checks.
        #[arg(long)]
        check: bool,
        /// With --check: the oldest a pending event may be, e.g. `30s`, `5m`.
        #[arg(long, value_parser = parse_duration, requires = "check")]
        max_age: Option<Duration>,
    },
    /// Where one event is and why: in the outbox, in the stream, and in each consumer
    /// group.
    Explain {
        /// The event id (a UUID).
        id: edupulse_events::Uuid,
    },
    /// The outbox: dead events, and putting them back in line.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Every consumer group (durable consumer) on the stream: pending, ack pending,
    /// redelivered, lag, dead letters.
    Consumers,
    /// Messages consumer groups gave up on.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Applies the edupulse migrations (schema edupulse) to the database.
    Migrate,
    /// Checks the events of a window end to end: every event the outbox holds as
    /// published is in the stream once and in order, and in the inbox of each group
    /// that handles it with on_tx; lists lost, duplicated, out-of-order and stuck
    /// events. Exits 1 when it finds any.
    Audit {
        /// The window: events emitted this long ago or since, e.g. `1h`.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        since: Duration,
        /// A pending event older than this is stuck.
        #[arg(long, value_parser = parse_duration, default_value = "1m")]
        stuck_after: Duration,
    },
}

/// `edupulse outbox ...`.
#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Lists dead events (JetStream rejected them for good), oldest first.
    Dead {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Puts dead events back in line for the relay (each gets a new sequence number).
    #[command(group(ArgGroup::new("which").required(true).args(["all", "id"])))]
    Requeue {
        /// Every dead event.
        #[arg(long)]
        all: bool,
        /// The dead events with these ids (repeat --id, or give several).
        #[arg(long, num_args = 1..)]
        id: Vec<edupulse_events::Uuid>,
    },
}

/// `edupulse dead-letters ...`.
#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// Lists a group's dead letters, oldest first.
    List {
        /// The consumer group.
        group: String,
        /// Only this reason: handler_failed, undecodable, unknown_event,
        /// unknown_version, handler_panicked, undeliverable.
        #[arg(long, value_parser = parse_reason)]
        reason: Option<edupulse_events::DeadReason>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Hands a group's dead letters back to that group alone, in stream order (deploy
    /// the fix first): a running instance of the group replays each within about a
    /// second; one that fails again stays a dead letter (`list` shows `replays`).
    #[command(group(ArgGroup::new("which").required(true).args(["all", "id", "reason"])))]
    Replay {
        /// The consumer group.
        group: String,
        /// Every letter of the group not replayed yet.
        #[arg(long)]
        all: bool,
        /// The letters with these ids (as `list` shows them).
        #[arg(long, num_args = 1..)]
        id: Vec<i64>,
        /// Every letter with this reason.
        #[arg(long, value_parser = parse_reason)]
        reason: Option<edupulse_events::DeadReason>,
    },
    /// Deletes a group's dead letters recorded longer ago than a duration.
    Purge {
        /// The consumer group.
        group: String,
        /// Only those older than this, e.g. `30d`, `12h`.
        #[arg(long, value_parser = parse_duration)]
        older_than: Duration,
    },
}

/// Reads `30s`, `5m`, `1h`, `30d` (humantime's syntax).
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("{error}; write a duration such as 30s, 5m, 1h or 30d"))
}

/// Reads a dead-letter reason as the table stores it.
fn parse_reason(text: &str) -> Result<edupulse_events::DeadReason, String> {
    text.parse().map_err(|error| format!("{error}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err((error, secrets)) => {
            let line = error::scrub(
                &error.to_string(),
                &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            eprintln!("error: {}", line.replace(['\n', '\r'], " "));
            ExitCode::from(1)
        }
    }
}

/// Runs the command; on failure, the error and the URLs whose secrets must not show.
async fn run(cli: Cli) -> Result<ExitCode, (CliError, Vec<String>)> {
    let urls = vec![
        cli.database_url.clone().unwrap_or_default(),
        cli.nats_url.clone(),
    ];
    let ctx = Ctx::new(&cli).map_err(|e| (e, urls.clone()))?;
    let json = cli.json;
    let outcome = match cli.command {
        Command::Status { check, max_age } => commands::status(&ctx, json, check, max_age).await,
        Command::Explain { id } => commands::explain(&ctx, json, id).await,
        Command::Outbox(OutboxCommand::Dead { limit }) => {
            commands::outbox_dead(&ctx, json, limit).await
        }
        Command::Outbox(OutboxCommand::Requeue { all, id }) => {
            commands::outbox_requeue(&ctx, json, all, id).await
        }
        Command::Consumers => commands::consumers(&ctx, json).await,
        Command::DeadLetters(DeadLettersCommand::List {
            group,
            reason,
            limit,
        }) => commands::dead_letters_list(&ctx, json, &group, reason, limit).await,
        Command::DeadLetters(DeadLettersCommand::Replay {
            group,
            all,
            id,
            reason,
        }) => {
            let which = match (all, reason) {
                (true, _) => edupulse_events::Replay::All,
                (false, Some(reason)) => edupulse_events::Replay::Reason(reason),
                (false, None) => edupulse_events::Replay::Ids(id),
            };
            commands::dead_letters_replay(&ctx, json, &group, which).await
        }
        Command::DeadLetters(DeadLettersCommand::Purge { group, older_than }) => {
            commands::dead_letters_purge(&ctx, json, &group, older_than).await
        }
        Command::Migrate => commands::migrate(&ctx, json).await,
        Command::Audit { since, stuck_after } => {
            commands::audit(&ctx, json, since, stuck_after).await
        }
    };
    outcome.map(|()| ExitCode::SUCCESS).map_err(|e| (e, urls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_read_as_humans_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert!(parse_duration("soon").is_err());
    }
}
