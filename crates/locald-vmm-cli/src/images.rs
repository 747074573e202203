//! The image commands: `pull`, `images`, `image rm` and `image prune`,
//! over the library's image cache ([`locald_vmm::image`]). Runs on the
//! main thread.

use anyhow::Context;
use locald_vmm::config::ImageRun;
use locald_vmm::GuestArch;

use crate::parse_arch;

/// `pull`: fetch an image into the cache.
#[derive(clap::Args, Debug)]
pub(crate) struct PullArgs {
    /// Image: a registry reference (`alpine`, `host:5000/app:tag`,
    /// `…@sha256:…`), an OCI layout directory, or a `docker save`/OCI
    /// archive tarball.
    image: String,
    /// Platform to pick from a multi-platform image: x86_64 or aarch64
    /// (default: the host's).
    #[arg(long, value_name = "ARCH", value_parser = parse_arch)]
    arch: Option<GuestArch>,
    /// Also build the image's root disk now (else the first run does).
    #[arg(long)]
    rootfs: bool,
    /// Speak plain HTTP to this registry (HOST or HOST:PORT; loopback
    /// registries always may). Repeatable.
    #[arg(long, value_name = "HOST")]
    insecure_registry: Vec<String>,
}

/// `image rm|prune`.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ImageCmd {
    /// Remove an image from the cache (its blobs go with the next prune).
    Rm {
        /// The image, as given to `pull`.
        image: String,
    },
    /// Delete cached blobs and root disks no image refers to.
    Prune,
}

pub(crate) fn pull(a: PullArgs) -> anyhow::Result<u8> {
    let run = ImageRun {
        source: a.image,
        insecure_registries: a.insecure_registry,
        offline: false,
    };
    let arch = a.arch.unwrap_or_else(GuestArch::host);
    let mut progress = locald_vmm::image::TerminalProgress::new();
    if a.rootfs {
        let img = locald_vmm::image::prepare(&run, arch, &mut progress)?;
        println!("{} {} {}", img.reference, img.digest, img.rootfs.display());
    } else {
        let img = locald_vmm::image::pull(&run, arch, &mut progress)?;
        println!("{} {}", img.reference, img.manifest_digest);
    }
    Ok(0)
}

pub(crate) fn images() -> anyhow::Result<u8> {
    let store = locald_vmm::image::store()?;
    let list = store.list().context("listing the image cache")?;
    println!("{:<60} {:<20} {:>10}", "IMAGE", "DIGEST", "SIZE");
    for e in list {
        let digest = e.manifest_digest.trim_start_matches("sha256:");
        println!(
            "{:<60} {:<20} {:>10}",
            e.reference,
            &digest[..digest.len().min(12)],
            human(e.size)
        );
    }
    Ok(0)
}

pub(crate) fn image(cmd: ImageCmd) -> anyhow::Result<u8> {
    match cmd {
        ImageCmd::Rm { image } => {
            locald_vmm::image::remove(&image)?;
            println!("removed {image}");
        }
        ImageCmd::Prune => {
            let s = locald_vmm::image::prune()?;
            println!(
                "pruned {} blobs and {} root disks, {} freed",
                s.blobs_removed,
                s.rootfs_removed,
                human(s.bytes_freed)
            );
        }
    }
    Ok(0)
}

/// Bytes for people: `512B`, `1.5K`, `20.0M`, `3.2G`.
fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_for_people() {
        assert_eq!(super::human(0), "0B");
        assert_eq!(super::human(1536), "1.5K");
        assert_eq!(super::human(20 << 20), "20.0M");
        assert_eq!(super::human(3 << 40), "3.0T");
    }
}
