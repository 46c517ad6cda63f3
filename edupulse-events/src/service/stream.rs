//! The stream that captures `{prefix}.>`: created when missing, checked when present.

use super::ConnectError;
use crate::config::Config;
use async_nats::jetstream::{self, context::CreateStreamErrorKind, stream, ErrorCode};

/// Makes sure the stream exists and captures `{prefix}.>`; returns its message size
/// limit, if it has one.
pub(super) async fn ensure(
    config: &Config,
    js: &jetstream::Context,
) -> Result<Option<usize>, ConnectError> {
    let found = match existing(config, js).await? {
        Some(found) => found,
        None => create(config, js).await?,
    };
    let differences = differences(config, &found);
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

/// The subjects the stream must capture.
fn subject(config: &Config) -> String {
    format!("{}.>", config.subject_prefix)
}

fn js_error(config: &Config, reason: String) -> ConnectError {
    ConnectError::JetStream {
        target: config.nats_url_redacted(),
        reason,
    }
}

/// The stream's configuration, if it exists.
async fn existing(
    config: &Config,
    js: &jetstream::Context,
) -> Result<Option<stream::Config>, ConnectError> {
    match js.get_stream(&config.stream).await {
        Ok(mut existing) => Ok(Some(
            existing
                .info()
                .await
                .map_err(|e| js_error(config, e.to_string()))?
                .config
                .clone(),
        )),
        Err(error) => match error.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(api)
                if api.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(js_error(config, error.to_string())),
        },
    }
}

/// Creates the stream as the configuration wants it; returns what the server made.
async fn create(config: &Config, js: &jetstream::Context) -> Result<stream::Config, ConnectError> {
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects: vec![subject(config)],
        storage: stream::StorageType::File,
        duplicate_window: config.duplicate_window,
        ..Default::default()
    };
    match js.create_stream(&wanted).await {
        Ok(mut created) => Ok(created
            .info()
            .await
            .map_err(|e| js_error(config, e.to_string()))?
            .config
            .clone()),
        Err(error) => Err(match error.kind() {
            CreateStreamErrorKind::JetStream(api)
                if api.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
            {
                ConnectError::StreamConflict {
                    stream: config.stream.clone(),
                    differences: format!(
                        "another stream already captures subjects overlapping `{}`",
                        subject(config)
                    ),
                }
            }
            _ => js_error(config, error.to_string()),
        }),
    }
}

/// What in `found` conflicts with the configuration, each said in words.
fn differences(config: &Config, found: &stream::Config) -> Vec<String> {
    let subject = subject(config);
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
    differences
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> Config {
        Config::builder("postgres://u@h/db")
            .subject_prefix("acme.events")
            .stream("ACME")
            .build()
            .expect("a valid config")
    }

    #[test]
    fn a_matching_stream_has_no_differences_and_each_mismatch_is_named() {
        let config = config();
        let good = stream::Config {
            name: "ACME".into(),
            subjects: vec!["acme.events.>".into()],
            duplicate_window: config.duplicate_window,
            ..Default::default()
        };
        assert!(differences(&config, &good).is_empty());
        let bad = stream::Config {
            subjects: vec!["other.>".into()],
            duplicate_window: Duration::from_secs(1),
            retention: stream::RetentionPolicy::WorkQueue,
            ..good
        };
        let found = differences(&config, &bad);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("acme.events.>"));
        assert!(found[1].contains("duplicate window"));
        assert!(found[2].contains("WorkQueue"));
    }
}
