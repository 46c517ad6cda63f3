//! The fault-injection suite of edupulse-events: crashes, pauses and cut connections
//! against real Postgres, NATS and child processes, with a checker in the style of
//! Jepsen's queue checker.
//!
//! - [`checker`]: every event carries `(writer, counter)`; at the end the suite reads the
//!   business table (what committed), the stream (what was published), the effects table
//!   and the inbox (what was handled) and reports lost, unexpected and duplicated events
//!   and per-subject order violations.
//! - [`proxy`]: a TCP fault proxy (latency, stalled connections, resets, refused
//!   connections) placed between the framework and Postgres or NATS.
//! - A private `nats-server` that a scenario may kill, pause and restart is
//!   `edupulse_events_tests::NatsServer`.
//! - [`cluster`]: a private three-node JetStream cluster whose nodes a scenario may
//!   kill, pause, restart or cut off.
//! - [`child`]: the relay and consumer child processes (`src/bin/`), killed with SIGKILL.
//! - [`workload`]: the schema, the writers and the effect-recording consumer.
//!
//! The scenarios are the integration tests in `tests/faults.rs`; see the crate's
//! README for what they show and how to run the short and the long versions.
#![warn(missing_docs)]

pub mod checker;
pub mod child;
pub mod cluster;
pub mod proxy;
pub mod scenario;
pub mod workload;

use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Prints the library's logs at the level `EDUPULSE_LOG` names (`error`, `warn`, `info`,
/// `debug`, `trace`), when it is set, for reading a scenario that failed:
/// `EDUPULSE_LOG=info cargo test -p edupulse-fault-suite --test cluster -- --nocapture`.
/// Every scenario calls it as it begins; once per process.
pub fn logs_from_env() {
    let Some(level) = std::env::var("EDUPULSE_LOG")
        .ok()
        .and_then(|level| level.parse::<tracing::Level>().ok())
    else {
        return;
    };
    let _ = tracing_subscriber::fmt().with_max_level(level).try_init();
}

/// The one event type of the suite: writer `writer`'s `counter`-th event. Its subject
/// is per writer, so per-subject order is per-writer order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
#[event(name = "fault.tick", subject = "fault.{writer}")]
pub struct Tick {
    /// Who wrote it.
    pub writer: u32,
    /// The writer's counter: strictly increasing in the writer's commit order.
    pub counter: u64,
}

/// How big a run is: `EDUPULSE_FAULTS=long` selects the long version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The default: every fault injected for real, with fewer events (minutes in all).
    Short,
    /// The sizes: 20,000 events per scenario, 1,000,000 for the soak.
    Long,
}

impl Scale {
    /// Reads `EDUPULSE_FAULTS` (`long` or `short`, default short).
    pub fn from_env() -> Scale {
        match std::env::var("EDUPULSE_FAULTS").as_deref() {
            Ok("long") => Scale::Long,
            _ => Scale::Short,
        }
    }

    /// `short` in the short version, `long` in the long one.
    pub fn pick<T>(self, short: T, long: T) -> T {
        match self {
            Scale::Short => short,
            Scale::Long => long,
        }
    }
}

/// A small seeded random generator (SplitMix64) for fault timing; the seed is printed
/// so that a run's schedule can be replayed with `EDUPULSE_FAULTS_SEED`.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// A generator seeded from `EDUPULSE_FAULTS_SEED` if set, otherwise at random;
    /// returns the generator and its seed.
    pub fn from_env() -> (Rng, u64) {
        let seed = std::env::var("EDUPULSE_FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let bytes = uuid::Uuid::new_v4().into_bytes();
                u64::from_le_bytes(bytes[..8].try_into().unwrap_or([7; 8]))
            });
        (Rng::new(seed), seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// A duration between `low_ms` and `high_ms` milliseconds.
    pub fn millis(&mut self, low_ms: u64, high_ms: u64) -> Duration {
        Duration::from_millis(self.between(low_ms, high_ms))
    }

    /// A new generator derived from this one (for a task of its own).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..1000 {
            let x = a.between(50, 300);
            assert_eq!(x, b.between(50, 300));
            assert!((50..=300).contains(&x));
        }
        let hits = (0..10_000).filter(|_| a.chance(0.25)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
    }

    #[test]
    fn scale_picks() {
        assert_eq!(Scale::Short.pick(1, 2), 1);
        assert_eq!(Scale::Long.pick(1, 2), 2);
    }
}
