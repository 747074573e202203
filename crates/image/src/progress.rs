//! Progress of a pull: the events [`crate::cache::ImageStore::pull`] reports
//! (on the calling thread, in order) and [`TerminalProgress`], which prints
//! one line per step, with bytes per layer, on a terminal and nothing
//! otherwise.

use std::io::{IsTerminal, Write};

/// One step of a pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressEvent<'a> {
    /// Resolving the source (a registry reference or a local path).
    Resolving { source: &'a str },
    /// The image manifest is known: its digest, the number of layers and
    /// their total (compressed) size.
    Manifest {
        digest: &'a str,
        layers: usize,
        total_bytes: u64,
    },
    /// Layer `index` (1-based) of `count` is being fetched, `size` bytes.
    LayerStarted {
        index: usize,
        count: usize,
        digest: &'a str,
        size: u64,
    },
    /// `done` of `size` bytes of layer `index` are written (reported every
    /// few hundred KiB; a printer may ignore it).
    LayerBytes { index: usize, done: u64, size: u64 },
    /// Layer `index` was fetched and matches its digest and size.
    LayerVerified {
        index: usize,
        count: usize,
        digest: &'a str,
        size: u64,
    },
    /// Layer `index` was already in the cache: nothing fetched.
    LayerCached {
        index: usize,
        count: usize,
        digest: &'a str,
        size: u64,
    },
    /// The image is in the cache under `reference`.
    Cached {
        reference: &'a str,
        manifest_digest: &'a str,
    },
}

/// Receives [`ProgressEvent`]s. Called on the thread that pulls.
pub trait Progress {
    fn event(&mut self, event: &ProgressEvent<'_>);
}

/// Ignores every event.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _: &ProgressEvent<'_>) {}
}

impl<F: FnMut(&ProgressEvent<'_>)> Progress for F {
    fn event(&mut self, event: &ProgressEvent<'_>) {
        self(event)
    }
}

/// Prints one line per step to stdout: resolving, the manifest, each
/// layer when it is verified (or found cached) with its size, and the
/// final reference. `LayerStarted`/`LayerBytes` print nothing (no
/// redrawn bars). [`TerminalProgress::new`] is quiet unless stdout is a
/// terminal; [`TerminalProgress::always`] prints regardless (the caller
/// decided).
#[derive(Debug)]
pub struct TerminalProgress {
    enabled: bool,
}

impl TerminalProgress {
    /// Prints only if stdout is a terminal.
    pub fn new() -> TerminalProgress {
        TerminalProgress {
            enabled: std::io::stdout().is_terminal(),
        }
    }

    /// Prints whatever stdout is.
    pub fn always() -> TerminalProgress {
        TerminalProgress { enabled: true }
    }

    /// The line an event prints, if any.
    pub fn line(event: &ProgressEvent<'_>) -> Option<String> {
        Some(match event {
            ProgressEvent::Resolving { source } => format!("resolving {source}"),
            ProgressEvent::Manifest {
                digest,
                layers,
                total_bytes,
            } => format!(
                "manifest {} ({layers} layer{}, {})",
                short(digest),
                if *layers == 1 { "" } else { "s" },
                human(*total_bytes)
            ),
            ProgressEvent::LayerStarted { .. } | ProgressEvent::LayerBytes { .. } => return None,
            ProgressEvent::LayerVerified {
                index,
                count,
                digest,
                size,
            } => format!(
                "layer {index}/{count} {} {} fetched and verified",
                short(digest),
                human(*size)
            ),
            ProgressEvent::LayerCached {
                index,
                count,
                digest,
                size,
            } => format!(
                "layer {index}/{count} {} {} already cached",
                short(digest),
                human(*size)
            ),
            ProgressEvent::Cached {
                reference,
                manifest_digest,
            } => format!("cached {reference} ({})", short(manifest_digest)),
        })
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        TerminalProgress::new()
    }
}

impl Progress for TerminalProgress {
    fn event(&mut self, event: &ProgressEvent<'_>) {
        if !self.enabled {
            return;
        }
        if let Some(line) = TerminalProgress::line(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

/// `sha256:0123456789ab` (12 hex digits).
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(0, |i| i + 1) + 12;
    &digest[..end.min(digest.len())]
}

/// Bytes as `123 B`, `4.5 KiB`, `6.7 MiB`, `1.2 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            TerminalProgress::line(&ProgressEvent::LayerVerified {
                index: 2,
                count: 3,
                digest: d,
                size: 3 * 1024 * 1024 / 2,
            })
            .unwrap(),
            "layer 2/3 sha256:0123456789ab 1.5 MiB fetched and verified"
        );
        assert_eq!(
            TerminalProgress::line(&ProgressEvent::LayerBytes {
                index: 1,
                done: 1,
                size: 2
            }),
            None
        );
        assert_eq!(human(512), "512 B");
        assert_eq!(human(2048), "2.0 KiB");
    }
}
