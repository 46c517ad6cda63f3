//! How a consumer group works: [`ConsumerSettings`], [`StartFrom`], and the check of
//! their ranges before a group starts.

use super::ConsumerError;
use crate::support::range::check_duration;
use async_nats::jetstream::consumer::DeliverPolicy;
use std::time::Duration;

/// The most lanes a group may have.
const MAX_CONCURRENCY: usize = 1024;

/// The most messages one pull request asks for.
const MAX_FETCH_BATCH: usize = 10_000;

/// Where a new consumer group starts reading the stream. An existing group goes on
/// where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event the stream holds.
    #[default]
    Beginning,
    /// From events published after the group is created.
    New,
}

impl StartFrom {
    /// The JetStream deliver policy of a new durable consumer.
    pub(super) fn deliver_policy(self) -> DeliverPolicy {
        match self {
            StartFrom::Beginning => DeliverPolicy::All,
            StartFrom::New => DeliverPolicy::New,
        }
    }
}

/// How a consumer group works; every field has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// How many events are handled at once. Events of one subject always go to the same
    /// lane, so with the default, 1, and with any value, events of one subject reach the
    /// handler in stream order. Default 1.
    ///
    /// The order holds for one running instance of the group, including across the
    /// death of an earlier one: an instance that starts while messages delivered before
    /// it are still unacked (given to an instance that died, say) holds the later
    /// messages, up to `ack_wait` and a margin, until the earlier ones come back, and
    /// handles them all in stream order. It does not hold when several instances run
    /// at once: they share a subject's events, and when one of them dies, the
    /// survivors have already handled later events by the time its unacked ones come
    /// back.
    pub concurrency: usize,
    /// How many times an event is handed to its handler before it is terminated and
    /// recorded in the dead-letter table. Default 5. Only the handler's failures count:
    /// when the framework itself cannot reach Postgres (to begin the `on_tx`
    /// transaction, record the event in the inbox or commit), the event is retried in
    /// its lane, with backoff, for as long as it takes.
    pub max_deliveries: u32,
    /// The delay before the second delivery; doubled each time, with jitter. Default 1 s.
    pub retry_base: Duration,
    /// The longest delay between deliveries. Default 60 s.
    pub retry_max: Duration,
    /// How long JetStream waits for an ack before it redelivers; the consumer sends
    /// progress while a handler runs or waits to retry. Default 30 s.
    pub ack_wait: Duration,
    /// How long `shutdown` lets handlers in flight finish. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Most messages fetched per pull request. Default 100.
    pub fetch_batch: usize,
    /// Where a new group starts. Default [`StartFrom::Beginning`].
    pub start_from: StartFrom,
    /// How long handled event ids are kept in the inbox, counted from when each was
    /// handled. Keep it longer than any republishing can happen. Default 7 days.
    pub inbox_retention: Duration,
    /// How long one call of a handler (with its transaction, for `on_tx`) may take:
    /// past it the call is abandoned (its transaction rolls back) and counts as a
    /// failed delivery, so that a handler stuck on a stalled connection cannot hold its
    /// subject for ever while progress acks keep the message. Default 5 minutes.
    pub handler_timeout: Duration,
    /// How long one of the consumer's own statements (the inbox record, the commit, a
    /// dead-letter record) may take before its connection is taken for dead; such a
    /// failure is retried without counting as a delivery. Default 30 s.
    pub statement_timeout: Duration,
    /// How many times JetStream delivers one message without an answer before it
    /// gives up and the group records it as a dead letter (`undeliverable`), read raw
    /// from the stream: for a message the client cannot even read (headers no client
    /// can parse), which would otherwise come back after every `ack_wait` for ever.
    /// Handler retries happen in the lane and do not count; redeliveries after an
    /// instance died or handed messages back at shutdown do. At least 2. Default 20.
    pub max_redeliveries: u32,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            concurrency: 1,
            max_deliveries: 5,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ack_wait: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            fetch_batch: 100,
            start_from: StartFrom::Beginning,
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            handler_timeout: Duration::from_secs(300),
            statement_timeout: Duration::from_secs(30),
            max_redeliveries: 20,
        }
    }
}

impl ConsumerSettings {
    /// Checks the settings a group cannot work with.
    pub(super) fn validate(&self) -> Result<(), ConsumerError> {
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err(ConsumerError::Settings(format!(
                "concurrency {} is out of range; use 1 to {MAX_CONCURRENCY}",
                self.concurrency
            )));
        }
        if self.max_deliveries == 0 || self.fetch_batch == 0 || self.ack_wait.is_zero() {
            return Err(ConsumerError::Settings(
                "max_deliveries, fetch_batch and ack_wait must be more than zero".to_owned(),
            ));
        }
        if self.max_redeliveries < 2 {
            return Err(ConsumerError::Settings(format!(
                "max_redeliveries {} is out of range; use 2 or more (default 20)",
                self.max_redeliveries
            )));
        }
        if self.fetch_batch > MAX_FETCH_BATCH {
            return Err(ConsumerError::Settings(format!(
                "fetch_batch {} is out of range; use 1 to {MAX_FETCH_BATCH}",
                self.fetch_batch
            )));
        }
        let durations = [
            ("retry_base", self.retry_base, None),
            ("retry_max", self.retry_max, None),
            ("ack_wait", self.ack_wait, None),
            ("handler_timeout", self.handler_timeout, None),
            ("statement_timeout", self.statement_timeout, None),
            ("inbox_retention", self.inbox_retention, None),
            (
                "shutdown_timeout",
                self.shutdown_timeout,
                Some("do not wait"),
            ),
        ];
        for (name, value, zero_means) in durations {
            check_duration(name, value, zero_means).map_err(ConsumerError::Settings)?;
        }
        if self.retry_max < self.retry_base {
            return Err(ConsumerError::Settings(format!(
                "retry_max ({:?}) is shorter than retry_base ({:?}); make it at least as long",
                self.retry_max, self.retry_base
            )));
        }
        Ok(())
    }

    /// The most messages the server delivers to the group without an ack: two fetch
    /// batches per lane (saturating instead of overflowing).
    pub(super) fn max_ack_pending(&self) -> i64 {
        i64::try_from(
            self.concurrency
                .saturating_mul(self.fetch_batch)
                .saturating_mul(2),
        )
        .unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(settings: ConsumerSettings) -> String {
        match settings.validate() {
            Err(ConsumerError::Settings(why)) => why,
            other => panic!("{settings:?} gave {other:?}"),
        }
    }

    #[test]
    fn the_defaults_and_the_edges_of_the_ranges_are_valid() {
        assert!(ConsumerSettings::default().validate().is_ok());
        for concurrency in [1, MAX_CONCURRENCY] {
            let settings = ConsumerSettings {
                concurrency,
                max_deliveries: 1,
                fetch_batch: 1,
                ack_wait: Duration::from_nanos(1),
                ..ConsumerSettings::default()
            };
            assert!(settings.validate().is_ok(), "{settings:?}");
        }
        let zero_wait = ConsumerSettings {
            shutdown_timeout: Duration::ZERO,
            fetch_batch: MAX_FETCH_BATCH,
            ..ConsumerSettings::default()
        };
        assert!(zero_wait.validate().is_ok());
    }

    #[test]
    fn durations_that_spin_or_overflow_are_refused() {
        let base = ConsumerSettings::default;
        for (settings, word) in [
            (
                ConsumerSettings {
                    retry_base: Duration::ZERO,
                    ..base()
                },
                "retry_base is zero",
            ),
            (
                ConsumerSettings {
                    retry_max: Duration::ZERO,
                    ..base()
                },
                "retry_max is zero",
            ),
            (
                ConsumerSettings {
                    handler_timeout: Duration::ZERO,
                    ..base()
                },
                "handler_timeout",
            ),
            (
                ConsumerSettings {
                    inbox_retention: Duration::ZERO,
                    ..base()
                },
                "inbox_retention",
            ),
            (
                ConsumerSettings {
                    ack_wait: Duration::MAX,
                    ..base()
                },
                "one year",
            ),
            (
                ConsumerSettings {
                    shutdown_timeout: Duration::MAX,
                    ..base()
                },
                "one year",
            ),
            (
                ConsumerSettings {
                    retry_max: Duration::MAX,
                    ..base()
                },
                "one year",
            ),
            (
                ConsumerSettings {
                    retry_base: Duration::from_secs(120),
                    ..base()
                },
                "retry_max",
            ),
            (
                ConsumerSettings {
                    fetch_batch: MAX_FETCH_BATCH + 1,
                    ..base()
                },
                "fetch_batch",
            ),
        ] {
            let why = refused(settings);
            assert!(why.contains(word), "{word}: {why}");
        }
    }

    #[test]
    fn concurrency_out_of_range_is_refused() {
        for concurrency in [0, MAX_CONCURRENCY + 1] {
            let why = refused(ConsumerSettings {
                concurrency,
                ..ConsumerSettings::default()
            });
            assert!(why.contains(&format!("concurrency {concurrency}")), "{why}");
            assert!(why.contains("1 to 1024"), "{why}");
        }
    }

    #[test]
    fn zero_deliveries_batch_or_ack_wait_is_refused() {
        let zeroes = [
            ConsumerSettings {
                max_deliveries: 0,
                ..ConsumerSettings::default()
            },
            ConsumerSettings {
                fetch_batch: 0,
                ..ConsumerSettings::default()
            },
            ConsumerSettings {
                ack_wait: Duration::ZERO,
                ..ConsumerSettings::default()
            },
        ];
        for settings in zeroes {
            assert!(refused(settings).contains("more than zero"));
        }
    }

    #[test]
    fn start_from_and_max_ack_pending_as_jetstream_takes_them() {
        assert_eq!(StartFrom::Beginning.deliver_policy(), DeliverPolicy::All);
        assert_eq!(StartFrom::New.deliver_policy(), DeliverPolicy::New);
        let settings = ConsumerSettings {
            concurrency: 4,
            fetch_batch: 100,
            ..ConsumerSettings::default()
        };
        assert_eq!(settings.max_ack_pending(), 800);
        let huge = ConsumerSettings {
            fetch_batch: usize::MAX,
            ..settings
        };
        assert_eq!(huge.max_ack_pending(), i64::MAX);
    }
}
