//! The stream that captures `{prefix}.>`: created when missing, checked when present.

use super::ConnectError;
use crate::config::{Config, StreamPlacement};
use crate::relay::AtomicBatches;
use async_nats::jetstream::{self, context::CreateStreamErrorKind, stream, ErrorCode};

/// The stream as [`ensure`] found or made it.
pub(super) struct Ensured {
    /// Its message size limit, if it has one.
    pub max_message: Option<usize>,
    /// Whether the relay may publish atomic batches: the configuration wants them and
    /// the server offers them (the relay reads whether the stream allows them).
    pub atomic: bool,
}

/// Makes sure the stream exists and captures `{prefix}.>`; says what the relay may
/// send it.
pub(super) async fn ensure(
    config: &Config,
    js: &jetstream::Context,
) -> Result<Ensured, ConnectError> {
    let version = js.client().server_info().version;
    let offered = offers_atomic(&version);
    let wanted = wants_atomic(config);
    if config.relay.atomic_batches == AtomicBatches::Always && !offered {
        return Err(ConnectError::ServerTooOld {
            target: config.nats_url_redacted(),
            version,
            feature: "atomic batch publish",
            needs: "2.12",
            instead: "set the relay's atomic_batches to Auto",
        });
    }
    let found = match existing(config, js).await? {
        Some(found) => found,
        None => create(config, js, wanted && offered).await?,
    };
    let differences = differences(config, &found);
    if !differences.is_empty() {
        return Err(ConnectError::StreamConflict {
            stream: config.stream.clone(),
            differences: differences.join("; "),
        });
    }
    if wanted && offered && !found.allow_atomic_publish {
        tracing::info!(
            stream = %config.stream,
            "the stream does not allow atomic batches (allow_atomic): the relay publishes each \
             event with its own acknowledgement, which is slower on a replicated stream, and \
             looks again every minute"
        );
    }
    Ok(Ensured {
        max_message: usize::try_from(found.max_message_size)
            .ok()
            .filter(|limit| *limit > 0),
        atomic: wanted && offered,
    })
}

/// Whether a server of this version offers atomic batch publish (2.12 and later).
pub(crate) fn offers_atomic(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (2, 12),
        _ => false,
    }
}

/// Whether the configuration wants the relay to publish atomic batches, where the
/// server offers them.
fn wants_atomic(config: &Config) -> bool {
    match config.relay.atomic_batches {
        AtomicBatches::Always => true,
        AtomicBatches::Auto => config.stream_replicas > 1,
        AtomicBatches::Never => false,
    }
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
async fn create(
    config: &Config,
    js: &jetstream::Context,
    allow_atomic: bool,
) -> Result<stream::Config, ConnectError> {
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects: vec![subject(config)],
        storage: stream::StorageType::File,
        duplicate_window: config.duplicate_window,
        num_replicas: config.stream_replicas,
        placement: config.stream_placement.as_ref().map(placement),
        allow_atomic_publish: allow_atomic,
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

/// JetStream's placement for ours.
fn placement(wanted: &StreamPlacement) -> stream::Placement {
    stream::Placement {
        cluster: wanted.cluster.clone(),
        tags: wanted.tags.clone(),
    }
}

/// What in `found` conflicts with the configuration, each said in words.
fn differences(config: &Config, found: &stream::Config) -> Vec<String> {
    let subject = subject(config);
    let mut differences = Vec::new();
    // JetStream reports 0 for a stream created without a count: one replica.
    let replicas = found.num_replicas.max(1);
    if replicas != config.stream_replicas {
        differences.push(format!(
            "it has {replicas} replica(s), not {} (stream_replicas); change one of them \
             (`nats stream edit {} --replicas {}` moves the stream)",
            config.stream_replicas, config.stream, config.stream_replicas
        ));
    }
    if let Some(wanted) = &config.stream_placement {
        let found_cluster = found.placement.as_ref().and_then(|p| p.cluster.clone());
        let mut found_tags = found
            .placement
            .as_ref()
            .map(|p| p.tags.clone())
            .unwrap_or_default();
        let mut wanted_tags = wanted.tags.clone();
        found_tags.sort();
        wanted_tags.sort();
        if wanted.cluster.is_some() && found_cluster != wanted.cluster {
            differences.push(format!(
                "it is placed in cluster {found_cluster:?}, not {:?}",
                wanted.cluster
            ));
        }
        if found_tags != wanted_tags {
            differences.push(format!(
                "its placement tags are {found_tags:?}, not {wanted_tags:?}"
            ));
        }
    }
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
    if config.relay.atomic_batches == AtomicBatches::Always && !found.allow_atomic_publish {
        differences.push(
            "it does not allow atomic batches (allow_atomic), which the relay's atomic_batches \
             Always needs; allow them on the stream, or set atomic_batches to Auto"
                .to_owned(),
        );
    }
    if found.no_ack {
        differences.push(
            "it does not acknowledge publishes (no_ack): the relay could never know an event \
             was stored"
                .to_owned(),
        );
    }
    if !config.allow_lossy_stream {
        differences.extend(losses(found));
    }
    differences
}

/// How `found` can drop events that were acknowledged before any consumer read them.
fn losses(found: &stream::Config) -> Vec<String> {
    let mut losses = Vec::new();
    if found.storage == stream::StorageType::Memory {
        losses.push("it keeps messages in memory, lost when the server restarts".to_owned());
    }
    if !found.max_age.is_zero() {
        losses.push(format!(
            "it drops messages older than {:?} (max_age), read or not",
            found.max_age
        ));
    }
    if found.discard == stream::DiscardPolicy::Old {
        let limits: Vec<String> = [
            ("max_msgs", found.max_messages),
            ("max_bytes", found.max_bytes),
            ("max_msgs_per_subject", found.max_messages_per_subject),
        ]
        .into_iter()
        .filter(|(_, limit)| *limit > 0)
        .map(|(name, limit)| format!("{name} {limit}"))
        .collect();
        if !limits.is_empty() {
            losses.push(format!(
                "it drops its oldest messages beyond {} (discard old), read or not",
                limits.join(", ")
            ));
        }
    }
    if !losses.is_empty() {
        losses.push(
            "if consumers always keep up within those limits, accept it with \
             ConfigBuilder::allow_lossy_stream(true)"
                .to_owned(),
        );
    }
    losses
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

    /// The stream `connect` would create for `config`.
    fn matching(config: &Config) -> stream::Config {
        stream::Config {
            name: "ACME".into(),
            subjects: vec!["acme.events.>".into()],
            duplicate_window: config.duplicate_window,
            ..Default::default()
        }
    }

    #[test]
    fn a_matching_stream_has_no_differences_and_each_mismatch_is_named() {
        let config = config();
        let good = matching(&config);
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

    #[test]
    fn replicas_and_placement_must_match_the_configuration() {
        let config = Config::builder("postgres://u@h/db")
            .subject_prefix("acme.events")
            .stream("ACME")
            .stream_replicas(3)
            .stream_placement(StreamPlacement {
                cluster: Some("east".into()),
                tags: vec!["ssd".into(), "az1".into()],
            })
            .build()
            .expect("a valid config");
        let good = stream::Config {
            num_replicas: 3,
            placement: Some(stream::Placement {
                cluster: Some("east".into()),
                tags: vec!["az1".into(), "ssd".into()],
            }),
            ..matching(&config)
        };
        assert!(differences(&config, &good).is_empty());
        let single = stream::Config {
            num_replicas: 0,
            placement: None,
            ..good.clone()
        };
        let found = differences(&config, &single);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("1 replica(s), not 3"), "{found:?}");
        assert!(found[1].contains("cluster None"), "{found:?}");
        assert!(found[2].contains("tags"), "{found:?}");
        // A single-replica configuration refuses a replicated stream too.
        let found = differences(&self::config(), &good);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("3 replica(s), not 1"), "{found:?}");
    }

    #[test]
    fn atomic_batches_where_the_server_offers_them_and_the_configuration_wants_them() {
        for (version, offered) in [
            ("2.9.10", false),
            ("2.11.4", false),
            ("2.12.0", true),
            ("2.15.1", true),
            ("2.12.0-beta.1", true),
            ("3.0.0", true),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(offers_atomic(version), offered, "{version}");
        }
        let with = |replicas: usize, mode: AtomicBatches| {
            Config::builder("postgres://u@h/db")
                .stream_replicas(replicas)
                .relay(crate::RelaySettings {
                    atomic_batches: mode,
                    ..Default::default()
                })
                .build()
                .expect("a valid config")
        };
        assert!(!wants_atomic(&with(1, AtomicBatches::Auto)));
        assert!(wants_atomic(&with(3, AtomicBatches::Auto)));
        assert!(wants_atomic(&with(1, AtomicBatches::Always)));
        assert!(!wants_atomic(&with(3, AtomicBatches::Never)));
        // Always needs a stream that allows them; Auto takes one that does not.
        let always = with(1, AtomicBatches::Always);
        let plain = stream::Config {
            name: "EDUPULSE".into(),
            subjects: vec!["edupulse.>".into()],
            duplicate_window: always.duplicate_window,
            ..Default::default()
        };
        let found = differences(&always, &plain);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("allow_atomic"), "{found:?}");
        let allowing = stream::Config {
            allow_atomic_publish: true,
            ..plain.clone()
        };
        assert!(differences(&always, &allowing).is_empty());
        assert!(differences(&with(1, AtomicBatches::Auto), &plain).is_empty());
    }

    #[test]
    fn a_stream_that_can_drop_unread_events_is_refused_unless_accepted() {
        let config = config();
        let good = matching(&config);
        let lossy = [
            (
                stream::Config {
                    storage: stream::StorageType::Memory,
                    ..good.clone()
                },
                "memory",
            ),
            (
                stream::Config {
                    max_age: Duration::from_secs(60),
                    ..good.clone()
                },
                "max_age",
            ),
            (
                stream::Config {
                    max_messages: 1000,
                    ..good.clone()
                },
                "max_msgs 1000",
            ),
            (
                stream::Config {
                    max_bytes: 1 << 20,
                    ..good.clone()
                },
                "max_bytes",
            ),
            (
                stream::Config {
                    max_messages_per_subject: 1,
                    ..good.clone()
                },
                "max_msgs_per_subject 1",
            ),
        ];
        for (found, word) in &lossy {
            let differences = differences(&config, found);
            assert!(
                differences.iter().any(|d| d.contains(word)),
                "{word}: {differences:?}"
            );
            assert!(differences.iter().any(|d| d.contains("allow_lossy_stream")));
        }
        // Limits that refuse new messages instead of dropping old ones lose nothing.
        let refusing = stream::Config {
            max_messages: 1000,
            discard: stream::DiscardPolicy::New,
            ..good.clone()
        };
        assert!(differences(&config, &refusing).is_empty());
        let accepting = Config::builder("postgres://u@h/db")
            .subject_prefix("acme.events")
            .stream("ACME")
            .allow_lossy_stream(true)
            .build()
            .expect("a valid config");
        for (found, word) in &lossy {
            assert!(differences(&accepting, found).is_empty(), "{word}");
        }
        // No acks: never accepted.
        let no_ack = stream::Config {
            no_ack: true,
            ..good
        };
        assert_eq!(differences(&accepting, &no_ack).len(), 1);
    }
}
