//! Build script: compiles (C guests), assembles and links every guest in `<workspace>/guests`
//! into `$OUT_DIR/guests/` and writes `$OUT_DIR/guests.rs` with one path
//! constant per guest.

#[allow(dead_code)] // only build() and the tables are used here
#[path = "src/builder.rs"]
mod builder;

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests_dir = manifest.join("../../guests");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let bin_dir = out.join("guests");

    println!("cargo:rerun-if-changed=src/builder.rs");
    for f in builder::SHARED_SOURCES {
        println!("cargo:rerun-if-changed={}", guests_dir.join(f).display());
    }
    let mut consts = String::new();
    for g in builder::GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            guests_dir.join(g.source()).display()
        );
        let path = match builder::build(g, &guests_dir, &bin_dir) {
            Ok(p) => p,
            Err(e) => panic!("building test guest {}: {e}", g.name),
        };
        let _ = writeln!(
            consts,
            "/// {}\npub const {}: &str = {:?};",
            g.about,
            g.name.to_uppercase(),
            path.to_str().expect("OUT_DIR is not UTF-8")
        );
    }
    std::fs::write(out.join("guests.rs"), consts).expect("writing guests.rs");
}
