//! Guest-RIP profiling report: turns the RIP samples the vCPU threads took
//! into a histogram by kernel symbol (from a `System.map`) and prints it to
//! stderr. Runs on the caller's thread after the VM stopped.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// One guest RIP sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Time since the VM was created.
    pub at: Duration,
    /// vCPU index.
    pub cpu: u8,
    /// Guest RIP.
    pub rip: u64,
}

/// Sorted `(address, name)` pairs from a `System.map`.
pub fn parse_system_map(text: &str) -> Vec<(u64, String)> {
    let mut syms: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let kind = it.next()?;
            let name = it.next()?;
            matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
        })
        .collect();
    syms.sort();
    syms
}

/// The symbol containing `rip`, if any.
pub fn symbolize(syms: &[(u64, String)], rip: u64) -> Option<&str> {
    let i = syms.partition_point(|(a, _)| *a <= rip);
    i.checked_sub(1).map(|i| syms[i].1.as_str())
}

fn name_of(syms: &[(u64, String)], rip: u64) -> String {
    if rip < 0xffff_8000_0000_0000 && !syms.is_empty() {
        "[guest user mode or low address]".to_string()
    } else {
        symbolize(syms, rip).map_or_else(|| format!("{rip:#x}"), str::to_string)
    }
}

/// Aggregates samples by symbol (or `user`/hex address without a match),
/// most frequent first.
pub fn histogram(samples: &[Sample], syms: &[(u64, String)]) -> Vec<(String, u64)> {
    let mut by: HashMap<String, u64> = HashMap::new();
    for s in samples {
        *by.entry(name_of(syms, s.rip)).or_default() += 1;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// Prints the top of the histogram to stderr and, when the environment
/// variable `LOCALD_VMM_PROFILE_TIMELINE` names a file, writes every sample
/// there as `seconds cpu symbol` lines (to see where a stall sits in time).
pub fn report(samples: &[Sample], system_map: Option<&Path>) {
    let syms = system_map
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| parse_system_map(&t))
        .unwrap_or_default();
    if let Ok(path) = std::env::var("LOCALD_VMM_PROFILE_TIMELINE") {
        let text: String = samples
            .iter()
            .map(|s| {
                format!(
                    "{:.3} {} {}\n",
                    s.at.as_secs_f64(),
                    s.cpu,
                    name_of(&syms, s.rip)
                )
            })
            .collect();
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("cannot write profile timeline {path}: {e}");
        }
    }
    let total = samples.len() as u64;
    eprintln!("guest RIP profile: {total} samples");
    for (name, n) in histogram(samples, &syms).into_iter().take(40) {
        eprintln!(
            "{:6.1}% {:6} {}",
            100.0 * n as f64 / total.max(1) as f64,
            n,
            name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_and_histogram() {
        let map = "ffffffff81000000 T _text\nffffffff81000100 t foo\nffffffff81000200 D data\nffffffff81000300 T bar\n";
        let syms = parse_system_map(map);
        assert_eq!(syms.len(), 3);
        assert_eq!(symbolize(&syms, 0xffffffff81000150), Some("foo"));
        assert_eq!(symbolize(&syms, 0xffffffff81000250), Some("foo"));
        assert_eq!(symbolize(&syms, 0xffffffff81000300), Some("bar"));
        assert_eq!(symbolize(&syms, 0x1000), None);
        let at = |rip, n| {
            std::iter::repeat_n(
                Sample {
                    at: Duration::ZERO,
                    cpu: 0,
                    rip,
                },
                n,
            )
        };
        let samples: Vec<Sample> = at(0xffffffff81000101, 3)
            .chain(at(0xffffffff81000102, 2))
            .chain(at(0x401000, 4))
            .collect();
        let h = histogram(&samples, &syms);
        assert_eq!(h[0], ("foo".to_string(), 5));
        assert_eq!(h[1].1, 4);
    }
}
