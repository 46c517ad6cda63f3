//! Where the end-to-end latency goes: each event's time split into stages by the
//! timestamps the bench takes on its way (all on the bench's monotonic clock):
//!
//! - **commit**: from just before `commit` until it returned (Postgres' WAL flush);
//! - **relay**: from the commit's return until a plain NATS subscriber on the subjects
//!   saw the message (the relay's wake-up, fence, read, publish; NATS' delivery);
//! - **consumer**: from there until the handler was called (the pull, the inbox
//!   check, the lane).
//!
//! For the tail, the events whose whole latency is at or above its p99: the mean of
//! each stage over them, so the figure says which stage made them slow.

use crate::{percentile_ms, Figure};
use std::time::{Duration, Instant};

/// The stages, in order.
pub const STAGES: [&str; 3] = ["commit", "relay", "consumer"];

/// Each event's stages, for the events that have every timestamp, after the first
/// `skip` (warm-up).
pub fn split(
    commit_started: &[Option<Instant>],
    committed: &[Option<Instant>],
    on_wire: &[Option<Instant>],
    handled: &[Option<Instant>],
    skip: usize,
) -> Vec<[Duration; 3]> {
    (0..commit_started.len())
        .skip(skip)
        .filter_map(|i| {
            let (a, b) = (
                commit_started.get(i)?.as_ref()?,
                committed.get(i)?.as_ref()?,
            );
            let (c, d) = (on_wire.get(i)?.as_ref()?, handled.get(i)?.as_ref()?);
            Some([
                b.saturating_duration_since(*a),
                c.saturating_duration_since(*b),
                d.saturating_duration_since(*c),
            ])
        })
        .collect()
}

/// p50 and p99 of each stage, and each stage's mean over the slowest 1 % of events
/// (by their whole latency) beside that whole.
pub fn figures(events: &[[Duration; 3]], label: &str) -> Vec<Figure> {
    let mut figures = Vec::new();
    if events.is_empty() {
        return figures;
    }
    for (stage, name) in STAGES.iter().enumerate() {
        let mut times: Vec<Duration> = events.iter().map(|e| e[stage]).collect();
        times.sort();
        for p in [50.0, 99.0] {
            figures.push(Figure {
                name: format!("{label}: {name} stage, p{p:.0}"),
                value: percentile_ms(&times, p),
                unit: "ms",
                baseline: None,
                ratio_meaning: "-",
                ratio: None,
                spread: None,
            });
        }
    }
    let tail = slowest(events, 1.0);
    let whole = mean_ms(tail.iter().map(|e| e.iter().sum::<Duration>()));
    for (stage, name) in STAGES.iter().enumerate() {
        let part = mean_ms(tail.iter().map(|e| e[stage]));
        figures.push(Figure {
            name: format!("{label}: slowest 1 %, mean {name} stage"),
            value: part,
            unit: "ms",
            baseline: Some(whole),
            ratio_meaning: "share of the slowest 1 %'s mean latency",
            ratio: Some(part / whole),
            spread: None,
        });
    }
    figures
}

/// The slowest `percent` % of events by their whole latency (at least one).
fn slowest(events: &[[Duration; 3]], percent: f64) -> Vec<[Duration; 3]> {
    let mut sorted = events.to_vec();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.iter().sum::<Duration>()));
    let n = ((events.len() as f64 * percent / 100.0).ceil() as usize).max(1);
    sorted.truncate(n);
    sorted
}

fn mean_ms(times: impl Iterator<Item = Duration>) -> f64 {
    let (sum, n) = times.fold((Duration::ZERO, 0u32), |(s, n), t| (s + t, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum.as_secs_f64() * 1000.0 / f64::from(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_split_each_event_and_the_tail_names_the_slow_stage() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        // 200 events: commit 1 ms, relay 2 ms, consumer 3 ms; the last two have a
        // 50 ms relay stage.
        let n = 200;
        let started: Vec<_> = (0..n).map(|_| at(0)).collect();
        let committed: Vec<_> = (0..n).map(|_| at(1)).collect();
        let wire: Vec<_> = (0..n)
            .map(|i| if i >= n - 2 { at(51) } else { at(3) })
            .collect();
        let handled: Vec<_> = (0..n)
            .map(|i| if i >= n - 2 { at(54) } else { at(6) })
            .collect();
        let mut with_gap = handled.clone();
        with_gap[5] = None;
        let events = split(&started, &committed, &wire, &with_gap, 1);
        assert_eq!(
            events.len(),
            n - 2,
            "the skipped and the incomplete are left out"
        );
        assert_eq!(events[0], [1, 2, 3].map(Duration::from_millis));
        let figures = figures(&events, "e2e");
        let tail_relay = figures
            .iter()
            .find(|f| f.name == "e2e: slowest 1 %, mean relay stage")
            .unwrap();
        assert_eq!(tail_relay.value, 50.0);
        assert_eq!(tail_relay.baseline, Some(54.0));
        let commit_p50 = figures
            .iter()
            .find(|f| f.name == "e2e: commit stage, p50")
            .unwrap();
        assert_eq!(commit_p50.value, 1.0);
    }
}
