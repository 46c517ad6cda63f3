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
