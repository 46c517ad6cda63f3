//! [`RelaySettings`]: how the relay works, with explicit defaults, and the check of
//! their ranges that [`ConfigBuilder::build`](crate::ConfigBuilder::build) runs.

use crate::support::range::check_duration;
use std::time::Duration;

/// How the relay works; every field has a default (see [`RelaySettings::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// Most events read and published per batch (1 to 4,000). Default 2,000.
    pub batch_size: u32,
    /// Most bytes of event bodies (as stored) read per batch, so that large events make
    /// smaller batches; a batch holds at least one event. Default 8 MiB.
    pub batch_bytes: u32,
    /// How often an idle leader looks for events without a notification. Default 1 s.
    pub poll_interval: Duration,
    /// How often a standby tries to take the lead. Default 1 s.
    pub standby_interval: Duration,
    /// How long to wait for JetStream to acknowledge a publish. Default 5 s.
    pub ack_timeout: Duration,
    /// First retry delay after a failed publish; doubled each attempt, with jitter. Default 100 ms.
    pub retry_base: Duration,
    /// Longest retry delay. Default 5 s.
    pub retry_max: Duration,
    /// How long published rows are kept before pruning; zero deletes them on publish.
    /// Default 1 hour.
    pub retention: Duration,
    /// Most rows deleted per pruning statement. Default 1,000.
    pub prune_batch: u32,
    /// How often published rows are pruned. Default 10 s.
    pub prune_interval: Duration,
    /// How long the relay waits for a transaction still writing earlier events before it
    /// publishes later ones that have committed (which then go out of order). Default 30 s.
    pub order_wait_limit: Duration,
    /// How long a leader keeps failing to publish (every attempt refused or unanswered,
    /// nothing published) before it lets go of the lead for a while, so that a replica
    /// that can reach NATS takes over. Zero: never. Default 30 s.
    pub yield_after: Duration,
    /// How long one of the relay's own statements may take before its connection is
    /// taken for dead and dropped: a connection that stalls without failing would
    /// otherwise hang the relay. Keep it above the slowest batch read. Default 30 s.
    pub statement_timeout: Duration,
    /// Whether the relay publishes its batches as JetStream atomic batches. Default
    /// [`AtomicBatches::Auto`].
    pub atomic_batches: AtomicBatches,
}

/// Whether the relay publishes its batches as JetStream atomic batches (nats-server
/// 2.12 and later): up to 1,000 events stored whole or not at all, with one
/// acknowledgement.
///
/// On a replicated stream that is faster than publishing each event with its own
/// acknowledgement (one round of the quorum per 1,000 events instead of one per
/// event); on a single server it is slower (the server stages a batch before it stores
/// it). Either way the order and the chain hold: see the README's "On a NATS cluster".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AtomicBatches {
    /// Where they pay: on a stream of more than one replica, on a server that offers
    /// them, when the stream allows them. A stream that `connect` creates allows them
    /// then.
    #[default]
    Auto,
    /// Always: `connect` creates the stream allowing them, and refuses to start when
    /// the server is older than 2.12 or the existing stream does not allow them.
    Always,
    /// Never: each event is published with its own acknowledgement.
    Never,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            batch_size: 2_000,
            batch_bytes: 8 * 1024 * 1024,
            poll_interval: Duration::from_secs(1),
            standby_interval: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(5),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            retention: Duration::from_secs(3600),
            prune_batch: 1000,
            prune_interval: Duration::from_secs(10),
            order_wait_limit: Duration::from_secs(30),
            yield_after: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(30),
            atomic_batches: AtomicBatches::Auto,
        }
    }
}

impl RelaySettings {
    /// The most events one batch may hold: async-nats allows 5,000 unacknowledged
    /// publishes per context, and a batch must fit.
    pub const MAX_BATCH_SIZE: u32 = 4_000;

    /// Checks every range; on failure, says which setting and what to use.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.batch_bytes == 0 {
            return Err("relay batch_bytes is 0; use 1 or more (default 8 MiB)".to_owned());
        }
        if self.batch_size == 0 || self.batch_size > Self::MAX_BATCH_SIZE {
            return Err(format!(
                "relay batch_size {} is out of range; use 1 to {}",
                self.batch_size,
                Self::MAX_BATCH_SIZE
            ));
        }
        if self.prune_batch == 0 {
            return Err("relay prune_batch is 0; use 1 or more".to_owned());
        }
        let durations = [
            ("relay poll_interval", self.poll_interval, None),
            ("relay standby_interval", self.standby_interval, None),
            ("relay ack_timeout", self.ack_timeout, None),
            ("relay retry_base", self.retry_base, None),
            ("relay retry_max", self.retry_max, None),
            ("relay prune_interval", self.prune_interval, None),
            ("relay statement_timeout", self.statement_timeout, None),
            ("relay retention", self.retention, Some("delete on publish")),
            (
                "relay order_wait_limit",
                self.order_wait_limit,
                Some("never wait"),
            ),
            ("relay yield_after", self.yield_after, Some("never yield")),
        ];
        for (name, value, zero_means) in durations {
            check_duration(name, value, zero_means)?;
        }
        if self.retry_max < self.retry_base {
            return Err(format!(
                "relay retry_max ({:?}) is shorter than retry_base ({:?}); make it at least as \
                 long",
                self.retry_max, self.retry_base
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_each_bad_range_is_named() {
        assert_eq!(RelaySettings::default().check(), Ok(()));
        let bad = |settings: RelaySettings, word: &str| {
            let error = settings.check().expect_err(word);
            assert!(error.contains(word), "{error}");
        };
        let base = RelaySettings::default;
        bad(
            RelaySettings {
                batch_bytes: 0,
                ..base()
            },
            "batch_bytes",
        );
        bad(
            RelaySettings {
                batch_size: 0,
                ..base()
            },
            "batch_size",
        );
        bad(
            RelaySettings {
                batch_size: 4_001,
                ..base()
            },
            "batch_size",
        );
        bad(
            RelaySettings {
                prune_batch: 0,
                ..base()
            },
            "prune_batch",
        );
        bad(
            RelaySettings {
                ack_timeout: Duration::ZERO,
                ..base()
            },
            "ack_timeout",
        );
        bad(
            RelaySettings {
                poll_interval: Duration::ZERO,
                ..base()
            },
            "poll_interval",
        );
        assert_eq!(
            RelaySettings {
                batch_size: 4_000,
                ..base()
            }
            .check(),
            Ok(())
        );
    }
}
