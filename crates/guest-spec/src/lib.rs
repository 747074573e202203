//! The spec files locald-vmm places under `/.locald/` in the guest's
//! initramfs, defined once for both sides: the VMM encodes them into the
//! small command archive it appends to the initramfs
//! (`locald_vmm::assets::command_archive`), the guest init
//! (`crates/guest-init`) decodes them at boot. Pure encoding and decoding,
//! std only, no dependencies; used on the VMM caller's thread and on the
//! guest init's only thread.
//!
//! | file ([`SpecFile`]) | module / type | format |
//! |---|---|---|
//! | `argv` | [`argv`] | NUL-terminated arguments |
//! | `env` | [`env`] | NUL-terminated `KEY=VALUE` |
//! | `workdir` | [`workdir`] | a path, no terminator |
//! | `agent` | [`AGENT_CONTENT`] | presence only (agent mode) |
//! | `shares` | [`shares`], [`ShareSpec`] | `TAG\0PATH\0MODE\0` per share |
//! | `net` | [`NetSpec`] | `KEY=VALUE` lines |
//! | `root` | [`RootSpec`] | `DEVICE\0FSTYPE\0MODE\0` (`MODE` may end in `+overlay`) |
//! | `rosetta` | [`RosettaSpec`] | a virtio-fs tag, no terminator |
//! | `image` | [`ImageSpec`] | NUL-terminated `KEY=VALUE` (`user`, `hostname`, `resolv`) |
//!
//! Every decoder takes untrusted bytes and returns a typed error (or, for
//! `argv`, `env` and `workdir`, which accept any bytes, a value); none
//! panics. Encoders cut strings at their first NUL (no format can carry
//! one), so `decode(encode(x)) == x` holds for every value without NUL
//! whose other fields are valid (see `tests.rs`).
//!
//! [`CommandSpec`] gathers a whole run: [`CommandSpec::files`] gives the
//! archive entries, [`CommandSpec::decode_files`] reads them back.

mod fields;

pub mod argv;
pub mod env;
pub mod exit_line;
pub mod image;
pub mod net;
pub mod root;
pub mod rosetta;
pub mod shares;
pub mod workdir;

#[cfg(test)]
mod tests;

pub use fields::split_nul;
pub use image::{ImageError, ImageSpec};
pub use net::{NetError, NetMode, NetSpec};
pub use root::{RootError, RootSpec};
pub use rosetta::{RosettaError, RosettaSpec};
pub use shares::{ShareSpec, SharesError};

/// The spec directory inside the guest.
pub const SPEC_DIR: &str = "/.locald";
/// The spec directory as an archive path (relative to the archive root).
pub const ARCHIVE_DIR: &str = ".locald";
/// Permission bits of [`ARCHIVE_DIR`] in the archive.
pub const DIR_MODE: u32 = 0o755;
/// Permission bits of every spec file in the archive.
pub const FILE_MODE: u32 = 0o644;
/// What the VMM writes to `agent` (the guest only checks that it exists).
pub const AGENT_CONTENT: &[u8] = b"1\n";

/// One spec file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecFile {
    /// Command and arguments.
    Argv,
    /// Extra environment.
    Env,
    /// Working directory.
    Workdir,
    /// Agent mode.
    Agent,
    /// virtio-fs shares.
    Shares,
    /// `eth0` configuration.
    Net,
    /// Root disk.
    Root,
    /// Rosetta share tag.
    Rosetta,
    /// OCI image configuration applied in the guest.
    Image,
}

impl SpecFile {
    /// Every spec file, in archive order.
    pub const ALL: [SpecFile; 9] = [
        Self::Argv,
        Self::Env,
        Self::Workdir,
        Self::Agent,
        Self::Shares,
        Self::Net,
        Self::Root,
        Self::Rosetta,
        Self::Image,
    ];

    /// File name inside [`SPEC_DIR`], e.g. `argv`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Argv => "argv",
            Self::Env => "env",
            Self::Workdir => "workdir",
            Self::Agent => "agent",
            Self::Shares => "shares",
            Self::Net => "net",
            Self::Root => "root",
            Self::Rosetta => "rosetta",
            Self::Image => "image",
        }
    }

    /// Archive path, e.g. `.locald/argv`.
    pub const fn archive_path(self) -> &'static str {
        match self {
            Self::Argv => ".locald/argv",
            Self::Env => ".locald/env",
            Self::Workdir => ".locald/workdir",
            Self::Agent => ".locald/agent",
            Self::Shares => ".locald/shares",
            Self::Net => ".locald/net",
            Self::Root => ".locald/root",
            Self::Rosetta => ".locald/rosetta",
            Self::Image => ".locald/image",
        }
    }

    /// Absolute guest path, e.g. `/.locald/argv`.
    pub const fn guest_path(self) -> &'static str {
        match self {
            Self::Argv => "/.locald/argv",
            Self::Env => "/.locald/env",
            Self::Workdir => "/.locald/workdir",
            Self::Agent => "/.locald/agent",
            Self::Shares => "/.locald/shares",
            Self::Net => "/.locald/net",
            Self::Root => "/.locald/root",
            Self::Rosetta => "/.locald/rosetta",
            Self::Image => "/.locald/image",
        }
    }

    /// The file with this archive path.
    pub fn from_archive_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.archive_path() == path)
    }
}

impl std::fmt::Display for SpecFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.guest_path())
    }
}

/// One archive entry: relative path, permission bits, contents.
pub type ArchiveFile = (&'static str, u32, Vec<u8>);

/// Everything the guest init is told for one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments (no shell). Empty: interactive shell.
    pub argv: Vec<Vec<u8>>,
    /// Extra environment, applied over the guest's defaults.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory (created if missing). `Some` of an empty path is
    /// written as an empty file and reads back as `None`.
    pub workdir: Option<Vec<u8>>,
    /// Agent mode: serve commands over vsock instead of running `argv`.
    pub agent: bool,
    /// virtio-fs shares to mount (after the root switch).
    pub shares: Vec<ShareSpec>,
    /// `eth0` configuration (the VM has a network card).
    pub net: Option<NetSpec>,
    /// Root disk to switch to before running the command.
    pub root: Option<RootSpec>,
    /// Rosetta share to mount and register for x86-64 binaries.
    pub rosetta: Option<RosettaSpec>,
    /// The root is an OCI image: its user, hostname and `resolv.conf`.
    pub image: Option<ImageSpec>,
}

/// Why a spec file was rejected: the file and its own error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// `/.locald/shares`.
    Shares(SharesError),
    /// `/.locald/net`.
    Net(NetError),
    /// `/.locald/root`.
    Root(RootError),
    /// `/.locald/rosetta`.
    Rosetta(RosettaError),
    /// `/.locald/image`.
    Image(ImageError),
}

impl SpecError {
    /// The file that was rejected.
    pub fn file(&self) -> SpecFile {
        match self {
            Self::Shares(_) => SpecFile::Shares,
            Self::Net(_) => SpecFile::Net,
            Self::Root(_) => SpecFile::Root,
            Self::Rosetta(_) => SpecFile::Rosetta,
            Self::Image(_) => SpecFile::Image,
        }
    }

    fn inner(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Shares(e) => e,
            Self::Net(e) => e,
            Self::Root(e) => e,
            Self::Rosetta(e) => e,
            Self::Image(e) => e,
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad {}: {}", self.file(), self.inner())
    }
}

impl std::error::Error for SpecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.inner())
    }
}

impl CommandSpec {
    /// The spec files for this run, in archive order: `argv` and `env`
    /// only when non-empty, `agent` only in agent mode, `shares` only when
    /// there are shares, the others when `Some` (`image` even when its
    /// content is empty: its presence means "image root"). All with [`FILE_MODE`];
    /// the archive must also hold the directory [`ARCHIVE_DIR`].
    pub fn files(&self) -> Vec<ArchiveFile> {
        let mut out = Vec::new();
        let mut add = |f: SpecFile, data: Vec<u8>| out.push((f.archive_path(), FILE_MODE, data));
        if !self.argv.is_empty() {
            add(SpecFile::Argv, argv::encode(&self.argv));
        }
        if !self.env.is_empty() {
            add(SpecFile::Env, env::encode(&self.env));
        }
        if let Some(w) = &self.workdir {
            add(SpecFile::Workdir, workdir::encode(w));
        }
        if self.agent {
            add(SpecFile::Agent, AGENT_CONTENT.to_vec());
        }
        if !self.shares.is_empty() {
            add(SpecFile::Shares, shares::encode(&self.shares));
        }
        if let Some(n) = &self.net {
            add(SpecFile::Net, n.encode());
        }
        if let Some(r) = &self.root {
            add(SpecFile::Root, r.encode());
        }
        if let Some(r) = &self.rosetta {
            add(SpecFile::Rosetta, r.encode());
        }
        if let Some(i) = &self.image {
            add(SpecFile::Image, i.encode());
        }
        out
    }

    /// Decodes a whole spec from the files present (absent files keep their
    /// default; a file given twice: the last one counts). Strict: the first
    /// bad file is the error. (The guest init decodes file by file instead,
    /// because it treats a bad `net` or `rosetta` file as non-fatal.)
    pub fn decode_files<'a>(
        files: impl IntoIterator<Item = (SpecFile, &'a [u8])>,
    ) -> Result<Self, SpecError> {
        let mut spec = CommandSpec::default();
        for (file, data) in files {
            match file {
                SpecFile::Argv => spec.argv = argv::decode(data),
                SpecFile::Env => spec.env = env::decode(data),
                SpecFile::Workdir => spec.workdir = workdir::decode(data),
                SpecFile::Agent => spec.agent = true,
                SpecFile::Shares => {
                    spec.shares = shares::decode(data).map_err(SpecError::Shares)?
                }
                SpecFile::Net => spec.net = Some(NetSpec::decode(data).map_err(SpecError::Net)?),
                SpecFile::Root => {
                    spec.root = Some(RootSpec::decode(data).map_err(SpecError::Root)?)
                }
                SpecFile::Rosetta => {
                    spec.rosetta = Some(RosettaSpec::decode(data).map_err(SpecError::Rosetta)?)
                }
                SpecFile::Image => {
                    spec.image = Some(ImageSpec::decode(data).map_err(SpecError::Image)?)
                }
            }
        }
        Ok(spec)
    }
}

/// Reads `dir/<file>` if it exists (`Ok(None)` when absent). `dir` is
/// normally [`SPEC_DIR`].
pub fn read_file(dir: &std::path::Path, file: SpecFile) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(dir.join(file.name())) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
