//! Guest-RIP profiling report: turns the RIP samples the vCPU threads took
//! into a histogram by kernel symbol (from a `System.map`) and prints it to
//! stderr. Runs on the caller's thread after the VM stopped.

use std::collections::HashMap;
use std::path::Path;

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

/// Aggregates samples by symbol (or `user`/hex address without a match),
/// most frequent first.
pub fn histogram(samples: &HashMap<u64, u64>, syms: &[(u64, String)]) -> Vec<(String, u64)> {
    let mut by: HashMap<String, u64> = HashMap::new();
    for (&rip, &n) in samples {
        let key = if rip < 0xffff_8000_0000_0000 && !syms.is_empty() {
            "[guest user mode or low address]".to_string()
        } else {
            symbolize(syms, rip).map_or_else(|| format!("{rip:#x}"), str::to_string)
        };
        *by.entry(key).or_default() += n;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// Prints the top of the histogram to stderr.
pub fn report(samples: &HashMap<u64, u64>, system_map: Option<&Path>) {
    let syms = system_map
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| parse_system_map(&t))
        .unwrap_or_default();
    let total: u64 = samples.values().sum();
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
        let samples = HashMap::from([
            (0xffffffff81000101, 3),
            (0xffffffff81000102, 2),
            (0x401000, 4),
        ]);
        let h = histogram(&samples, &syms);
        assert_eq!(h[0], ("foo".to_string(), 5));
        assert_eq!(h[1].1, 4);
    }
}
