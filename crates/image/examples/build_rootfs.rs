//! Builds an ext4 root filesystem from layer tarballs, as `run --image`
//! will: `Unpacker` + `cached_rootfs`. A manual tool for real-guest
//! checks (see docs/oci-images.md):
//!
//! ```text
//! cargo run -p locald-image --example build_rootfs -- OUT.ext4 LAYER.tar[.gz|.zst]...
//! ```
//!
//! Layers are sniffed (plain, gzip or zstd). Prints the build's stats.

use std::path::PathBuf;

use locald_image::rootfs::{cached_rootfs, RootfsOptions};
use locald_image::unpack::{Limits, Unpacker};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let Some(dest) = args.next().map(PathBuf::from) else {
        eprintln!("usage: build_rootfs OUT.ext4 LAYER.tar...");
        std::process::exit(2);
    };
    let layers: Vec<PathBuf> = args.map(PathBuf::from).collect();
    let img = cached_rootfs(&dest, &RootfsOptions::default(), |staging| {
        let mut u = Unpacker::new(staging, Limits::default())?;
        for l in &layers {
            let f = std::fs::File::open(l).map_err(locald_image::unpack::UnpackError::Read)?;
            u.apply_layer_sniffed(std::io::BufReader::new(f))?;
        }
        u.finish().map(|(t, _)| t)
    })?;
    match img.built {
        Some(stats) => println!("built {}: {stats:?}", img.path.display()),
        None => println!("cached {}", img.path.display()),
    }
    Ok(())
}
