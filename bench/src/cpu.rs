//! Where the time goes: the CPU time the bench process (the relay, the clients), the
//! Postgres processes and the `nats-server` processes of this machine use while a
//! stage runs, read from `/proc`. On a machine with few cores the relay's drain and the
//! raw publish compete for the same cores, so the CPU each side costs per event says
//! more about what limits the ratio than the wall time alone.

use std::ops::{Add, Sub};
use std::time::Duration;

/// CPU time used, by component.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    /// This process: the relay or the raw publisher, and every client in it.
    pub bench: Duration,
    /// Every `postgres` process (backends that ended included, through the
    /// postmaster's reaped children).
    pub postgres: Duration,
    /// Every `nats-server` process.
    pub nats: Duration,
}

impl Sub for Cpu {
    type Output = Cpu;

    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            bench: self.bench.saturating_sub(earlier.bench),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            nats: self.nats.saturating_sub(earlier.nats),
        }
    }
}

impl Add for Cpu {
    type Output = Cpu;

    fn add(self, more: Cpu) -> Cpu {
        Cpu {
            bench: self.bench + more.bench,
            postgres: self.postgres + more.postgres,
            nats: self.nats + more.nats,
        }
    }
}

impl Cpu {
    /// The CPU time used so far; zero for what `/proc` does not show (another machine,
    /// or not Linux).
    pub fn now() -> Cpu {
        let tick = ticks_per_second();
        let mut cpu = Cpu::default();
        let own = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(process) = Stat::parse(&stat) else {
                continue;
            };
            let used = |ticks: u64| Duration::from_secs_f64(ticks as f64 / tick);
            if pid == own {
                cpu.bench += used(process.own);
            } else if process.name == "postgres" {
                cpu.postgres += used(process.own + process.children);
            } else if process.name == "nats-server" {
                cpu.nats += used(process.own + process.children);
            }
        }
        cpu
    }

    /// The three together.
    pub fn total(&self) -> Duration {
        self.bench + self.postgres + self.nats
    }

    /// Milliseconds of CPU per 1,000 of `events`: bench, postgres, nats-server.
    pub fn per_thousand(&self, events: usize) -> [f64; 3] {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / events.max(1) as f64;
        [per(self.bench), per(self.postgres), per(self.nats)]
    }
}

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, PartialEq)]
struct Stat {
    /// Its name (`comm`).
    name: String,
    /// User and system time, in clock ticks.
    own: u64,
    /// User and system time of its children that ended and were waited for.
    children: u64,
}

impl Stat {
    /// Reads a stat line: `pid (comm) state ppid ...`, where comm may hold spaces and
    /// parentheses, so the fields are counted from the last `)`.
    fn parse(line: &str) -> Option<Stat> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let name = line.get(open + 1..close)?.to_owned();
        let fields: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
        // After comm: state is field 3 (index 0 here); utime 14, stime 15, cutime 16,
        // cstime 17.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Some(Stat {
            name,
            own: field(14)? + field(15)?,
            children: field(16)? + field(17)?,
        })
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .filter(|ticks: &f64| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_reads_from_the_last_parenthesis() {
        let line = "2211 (postgres) S 1 2211 2211 0 -1 4194560 1 2 0 0 150 30 7 5 20 0 1 0 \
                    100 0 0";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                name: "postgres".into(),
                own: 180,
                children: 12,
            })
        );
        let odd = "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 1 2 3 4 20 0";
        assert_eq!(
            Stat::parse(odd).map(|s| (s.name, s.own)),
            Some(("a (b) c".into(), 3))
        );
        assert_eq!(Stat::parse("garbage"), None);
    }

    #[test]
    fn this_process_uses_some_cpu() {
        let before = Cpu::now();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let used = Cpu::now() - before;
        assert!(used.bench > Duration::ZERO, "{used:?}");
    }
}
