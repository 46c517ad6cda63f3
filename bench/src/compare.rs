//! Comparing a run with a saved one: `--save FILE` keeps a run's figures (its JSON
//! lines), `--compare FILE` sets this run's ratios beside them, figure by figure, and
//! says which moved by more than the rounds' spread. A pull request runs
//! `--save before.jsonl` on its base and `--compare before.jsonl` on its head, on the
//! same machine.

use crate::Figure;
use serde::Deserialize;

/// A figure as a saved run holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct Saved {
    /// What was measured.
    pub name: String,
    /// The ratio to the raw baseline.
    pub ratio: Option<f64>,
    /// The lowest and highest single-round ratio.
    #[serde(default)]
    pub ratio_spread: Option<[f64; 2]>,
}

/// How far a ratio may move, without a spread to judge by, before it counts as a change.
const NOISE: f64 = 0.05;

/// Reads a saved run: one JSON object per line (what the program prints); other lines
/// are skipped.
pub fn read(text: &str) -> Vec<Saved> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Saved>(line.trim()).ok())
        .collect()
}

/// One line per figure of `now` that `before` also has: both ratios, their spreads, and
/// whether the change is beyond the noise (the two runs' round ranges do not overlap,
/// or, without spreads, it moved by more than [`NOISE`]).
pub fn report(before: &[Saved], now: &[Figure]) -> Vec<String> {
    now.iter()
        .filter_map(|figure| {
            let old = before.iter().find(|saved| saved.name == figure.name)?;
            let (was, is) = (old.ratio?, figure.ratio?);
            let old_spread = old.ratio_spread.map(|[low, high]| (low, high));
            let verdict = match (old_spread, figure.spread) {
                (Some((old_low, old_high)), Some((low, high))) => {
                    if low > old_high {
                        "higher, beyond the spread"
                    } else if high < old_low {
                        "lower, beyond the spread"
                    } else {
                        "within the spread"
                    }
                }
                _ if (is - was).abs() <= NOISE => "within the noise",
                _ if is > was => "higher",
                _ => "lower",
            };
            let range = |spread: Option<(f64, f64)>| {
                spread
                    .map(|(low, high)| format!(" ({low:.2}-{high:.2})"))
                    .unwrap_or_default()
            };
            Some(format!(
                "{}: {was:.2}{} -> {is:.2}{}: {verdict}",
                figure.name,
                range(old_spread),
                range(figure.spread)
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(name: &str, ratio: f64, spread: Option<(f64, f64)>) -> Figure {
        Figure {
            name: name.into(),
            value: 1.0,
            unit: "events/s",
            baseline: Some(1.0),
            ratio_meaning: "",
            ratio: Some(ratio),
            spread,
        }
    }

    #[test]
    fn a_saved_run_reads_back_from_its_json_lines() {
        let saved = read(
            "table line\n\
             {\"name\":\"relay\",\"ratio\":0.7,\"ratio_spread\":[0.6,0.75],\"value\":1}\n\
             {\"name\":\"emit\",\"ratio\":1.1,\"ratio_spread\":null}\n",
        );
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[0].ratio_spread, Some([0.6, 0.75]));
        assert_eq!(saved[1].ratio_spread, None);
    }

    #[test]
    fn a_change_counts_only_beyond_the_spread_or_the_noise() {
        let before = read(
            "{\"name\":\"relay\",\"ratio\":0.6,\"ratio_spread\":[0.55,0.65]}\n\
             {\"name\":\"slow\",\"ratio\":0.6,\"ratio_spread\":[0.55,0.65]}\n\
             {\"name\":\"same\",\"ratio\":0.6,\"ratio_spread\":[0.55,0.65]}\n\
             {\"name\":\"plain\",\"ratio\":1.0}\n\
             {\"name\":\"gone\",\"ratio\":1.0}\n",
        );
        let now = [
            figure("relay", 0.8, Some((0.7, 0.85))),
            figure("slow", 0.4, Some((0.35, 0.5))),
            figure("same", 0.66, Some((0.6, 0.7))),
            figure("plain", 1.03, None),
            figure("new", 1.0, None),
        ];
        let lines = report(&before, &now);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].ends_with("higher, beyond the spread"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].ends_with("lower, beyond the spread"),
            "{}",
            lines[1]
        );
        assert!(lines[2].ends_with("within the spread"), "{}", lines[2]);
        assert!(lines[3].ends_with("within the noise"), "{}", lines[3]);
        assert_eq!(
            lines[0],
            "relay: 0.60 (0.55-0.65) -> 0.80 (0.70-0.85): higher, beyond the spread"
        );
    }
}
