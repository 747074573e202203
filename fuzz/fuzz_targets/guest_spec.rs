//! Fuzzes the decoders of the `/.locald/` spec files (`locald-guest-spec`),
//! which the guest init runs on whatever the initramfs holds: the first
//! input byte picks the file, the rest is its contents.
//!
//! Oracles, besides "no panic": a file that decodes re-encodes to bytes
//! that decode to the same value (`decode ∘ encode` is the identity on
//! decoded values), and the decoded strings hold no NUL.

#![no_main]

use libfuzzer_sys::fuzz_target;
use locald_guest_spec::{CommandSpec, SpecFile};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, contents)) = data.split_first() else {
        return;
    };
    let file = SpecFile::ALL[pick as usize % SpecFile::ALL.len()];
    let Ok(spec) = CommandSpec::decode_files([(file, contents)]) else {
        return;
    };
    let no_nul = |b: &[u8]| !b.contains(&0);
    assert!(spec.argv.iter().all(|a| no_nul(a)));
    assert!(spec.env.iter().all(|(k, v)| no_nul(k) && no_nul(v) && !k.is_empty()));
    assert!(spec.workdir.as_deref().is_none_or(no_nul));
    let files = spec.files();
    let again = CommandSpec::decode_files(
        files
            .iter()
            .map(|(p, _, d)| (SpecFile::from_archive_path(p).unwrap(), d.as_slice())),
    )
    .expect("re-encoded spec decodes");
    assert_eq!(again, spec, "{file:?} {contents:?}");
});
