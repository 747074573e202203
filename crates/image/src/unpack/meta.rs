//! The metadata table: what the staged host tree cannot hold because the
//! unpacker is not root (ownership, special mode bits, device nodes,
//! non-`user.*` xattrs), for the ext4 builder to apply inside the image
//! (`debugfs`: `set_inode_field`, `ea_set`, `mknod`).
//!
//! Shape: one [`Record`] per path that exists in the staged tree, keyed by
//! the path's canonical form relative to the root (components joined by
//! `/`, no leading `/`, no `.`/`..`, symlinked parents resolved; `""` is
//! the root directory itself). Paths are bytes: Linux names need not be
//! UTF-8. The table is kept in step with the tree across layers: a later
//! layer's entry replaces the record, a whiteout or a replaced directory
//! removes the record and every record under it, and a hard link gets a
//! copy of its target's record (same inode, same metadata).
//!
//! Serialized (serde) as a list of `[path, record]` pairs sorted by path,
//! paths and xattr names/values as byte arrays.
//!
//! Plain data; used on the unpacker's (the caller's) thread.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a path is in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    /// Staged on the host as an empty regular file (a placeholder); the
    /// builder replaces it with the device node.
    CharDevice {
        major: u32,
        minor: u32,
    },
    /// As [`NodeKind::CharDevice`].
    BlockDevice {
        major: u32,
        minor: u32,
    },
    /// As [`NodeKind::CharDevice`] (a placeholder file on the host).
    Fifo,
}

impl NodeKind {
    /// A device node or fifo: staged as a placeholder file only.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. } | NodeKind::Fifo
        )
    }
}

/// The metadata of one path as the layer declared it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub kind: NodeKind,
    /// Permission bits including setuid (0o4000), setgid (0o2000) and
    /// sticky (0o1000): `mode & 0o7777` of the tar header. The host file
    /// has only `mode & 0o777`, plus owner read/write (files) or
    /// read/write/search (directories) so the builder can read it.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch (also set on the host file).
    pub mtime: u64,
    /// Every extended attribute of the entry (PAX `SCHILY.xattr.NAME`),
    /// any namespace, sorted by name. Only `user.*` ones are also set on
    /// the host file (best effort).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Path → [`Record`] for the whole staged tree; see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(Vec<u8>, Record)>", into = "Vec<(Vec<u8>, Record)>")]
pub struct MetadataTable {
    entries: BTreeMap<Vec<u8>, Record>,
}

impl From<Vec<(Vec<u8>, Record)>> for MetadataTable {
    fn from(v: Vec<(Vec<u8>, Record)>) -> Self {
        MetadataTable {
            entries: v.into_iter().collect(),
        }
    }
}

impl From<MetadataTable> for Vec<(Vec<u8>, Record)> {
    fn from(t: MetadataTable) -> Self {
        t.entries.into_iter().collect()
    }
}

impl MetadataTable {
    /// The record of a canonical path (`b"usr/bin/ls"`, `b""` for the root).
    pub fn get(&self, path: &[u8]) -> Option<&Record> {
        self.entries.get(path)
    }

    /// All records, sorted by path (a parent before its children).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Record)> {
        self.entries.iter().map(|(k, v)| (k.as_slice(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn insert(&mut self, path: Vec<u8>, rec: Record) {
        self.entries.insert(path, rec);
    }

    /// Removes `path` and every record under `path/`.
    pub(crate) fn remove_tree(&mut self, path: &[u8]) {
        self.entries.remove(path);
        let mut prefix = path.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let doomed: Vec<Vec<u8>> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }
}
