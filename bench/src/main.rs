//! Benchmarks: every stage of edupulse-events beside a raw baseline measured in the
//! same run, against the local Postgres and NATS.
//!
//! ```sh
//! cargo run --release -p edupulse-bench            # the full run (BENCHMARKS.md)
//! cargo run --release -p edupulse-bench -- --quick # a smaller, faster run
//! cargo run --release -p edupulse-bench -- --cluster # relay and e2e on a local
//!                                                   # three-node cluster, R3 streams
//! ```
//!
//! `--only relay,e2e` runs the stages named. `--recorder` installs a Prometheus metrics
//! recorder first (what a service that exports metrics runs with), to compare a run
//! with one and a run without. `--cluster` starts three `nats-server`
//! processes of the newest binary found (see `edupulse_fault_suite::cluster`) and runs
//! the relay and end-to-end stages (unless `--only` names others) against three-replica
//! streams, the raw baselines too.
//!
//! `--save FILE` writes the run's JSON lines to FILE too; `--compare FILE` then prints
//! this run's ratios beside that saved run's, figure by figure, and which moved beyond
//! the spread of their rounds (see `compare`): run `--save` on a pull request's base and
//! `--compare` on its head, on the same machine, with the same options.
//!
//! `--rounds N` sets how many interleaved rounds of the relay drain and the raw
//! pipelined publish are counted (3 in the full run), after one warm-up round.
//!
//! Output: a table, then one JSON line per figure (name, value, unit, baseline, ratio,
//! and for figures measured in interleaved rounds the lowest and highest ratio of a
//! single round, `ratio_spread`).
//! Nothing here fails on a timing: these are measurements, not tests.

mod breakdown;
mod compare;
mod cpu;
mod raw;
mod stages;

use std::time::Duration;

/// One measured figure beside its baseline.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The framework's value.
    pub value: f64,
    /// The unit of both values.
    pub unit: &'static str,
    /// The raw baseline's value, when there is one.
    pub baseline: Option<f64>,
    /// What the ratio means, e.g. "framework time / raw time".
    pub ratio_meaning: &'static str,
    /// The ratio as the meaning says.
    pub ratio: Option<f64>,
    /// The lowest and highest ratio of single rounds, for a figure measured in
    /// interleaved rounds: how far one round strays from the median.
    pub spread: Option<(f64, f64)>,
}

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Events per emit measurement.
    pub emits: usize,
    /// Rounds of `emit_all` of 500.
    pub batches: usize,
    /// Events drained by the relay.
    pub relay_events: usize,
    /// Rounds of (drain, raw pipelined publish) with the default settings, interleaved;
    /// the medians are reported.
    pub relay_rounds: usize,
    /// Events published one ack at a time.
    pub sequential_publishes: usize,
    /// Seconds of the steady end-to-end run.
    pub e2e_seconds: u64,
    /// Seconds per step when searching the highest steady rate.
    pub step_seconds: u64,
    /// Events consumed.
    pub consume_events: usize,
    /// Pending events for the memory figure.
    pub memory_events: usize,
}

impl Scale {
    fn full() -> Scale {
        Scale {
            emits: 4_000,
            batches: 40,
            relay_events: 50_000,
            relay_rounds: 3,
            sequential_publishes: 5_000,
            e2e_seconds: 10,
            step_seconds: 4,
            consume_events: 50_000,
            memory_events: 1_000_000,
        }
    }

    fn quick() -> Scale {
        Scale {
            emits: 1_000,
            batches: 10,
            relay_events: 10_000,
            relay_rounds: 1,
            sequential_publishes: 1_000,
            e2e_seconds: 3,
            step_seconds: 2,
            consume_events: 10_000,
            memory_events: 100_000,
        }
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // The relay child of the memory figure.
    if args.get(1).map(String::as_str) == Some("--relay-child") {
        return stages::relay_child(args.get(2).map(String::as_str));
    }
    let mut scale = if args.iter().any(|a| a == "--quick") {
        Scale::quick()
    } else {
        Scale::full()
    };
    if let Some(rounds) = args.iter().position(|a| a == "--rounds") {
        match args.get(rounds + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n > 0 => scale.relay_rounds = n,
            _ => {
                eprintln!("--rounds takes a number of rounds, 1 or more");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let cluster = args.iter().any(|a| a == "--cluster");
    if args.iter().any(|a| a == "--recorder") {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            eprintln!("cannot install the metrics recorder: {error}");
            return std::process::ExitCode::FAILURE;
        }
        edupulse_events::telemetry::describe_metrics();
        eprintln!("a Prometheus metrics recorder is installed");
    }
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let save = value_of("--save");
    let before = match value_of("--compare") {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => Some(compare::read(&text)),
            Err(error) => {
                eprintln!("cannot read the saved run {path}: {error}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| cluster.then(|| "relay,e2e".to_owned()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start tokio: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Kept until the stages are done; dropping it stops the servers.
        let _cluster = if cluster {
            Some(start_cluster().await)
        } else {
            None
        };
        stages::run_all(scale, only).await
    });
    match result {
        Ok(figures) => {
            print_table(&figures);
            let lines: Vec<String> = figures.iter().map(json_line).collect();
            for line in &lines {
                println!("{line}");
            }
            if let Some(before) = before {
                println!();
                println!("compared with the saved run:");
                for line in compare::report(&before, &figures) {
                    println!("  {line}");
                }
            }
            if let Some(path) = save {
                let mut text = lines.join("\n");
                text.push('\n');
                if let Err(error) = std::fs::write(&path, text) {
                    eprintln!("cannot save the run to {path}: {error}");
                    return std::process::ExitCode::FAILURE;
                }
                eprintln!("saved the run's figures to {path}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("benchmark failed: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A local three-node cluster of the newest `nats-server` found, for `--cluster`.
async fn start_cluster() -> edupulse_fault_suite::cluster::NatsCluster {
    use edupulse_fault_suite::cluster::{
        server_binaries, version_number, version_of, NatsCluster, NODES,
    };
    let binary = server_binaries()
        .into_iter()
        .max_by_key(|binary| version_of(binary).and_then(|v| version_number(&v)))
        .unwrap_or_else(|| "nats-server".to_owned());
    eprintln!(
        "cluster: three nodes of {}",
        version_of(&binary).unwrap_or_else(|| binary.clone())
    );
    let cluster = NatsCluster::start(&binary).await;
    cluster.wait_ready().await;
    let _ = stages::CLUSTER.set((cluster.urls(), NODES));
    cluster
}

fn print_table(figures: &[Figure]) {
    println!();
    println!(
        "{:<58} {:>14} {:>14} {:>8} {:>11}  unit / ratio meaning",
        "figure", "edupulse", "raw", "ratio", "rounds"
    );
    println!("{}", "-".repeat(142));
    for f in figures {
        println!(
            "{:<58} {:>14} {:>14} {:>8} {:>11}  {} / {}",
            f.name,
            format_value(f.value),
            f.baseline.map(format_value).unwrap_or_else(|| "-".into()),
            f.ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            f.spread
                .map(|(low, high)| format!("{low:.2}-{high:.2}"))
                .unwrap_or_else(|| "-".into()),
            f.unit,
            f.ratio_meaning
        );
    }
    println!();
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn json_line(f: &Figure) -> String {
    serde_json::json!({
        "name": f.name,
        "value": f.value,
        "unit": f.unit,
        "baseline": f.baseline,
        "ratio": f.ratio,
        "ratio_spread": f.spread.map(|(low, high)| [low, high]),
        "ratio_meaning": f.ratio_meaning,
    })
    .to_string()
}

/// Percentile of sorted durations, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}
