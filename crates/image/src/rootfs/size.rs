//! Sizing the ext4 image from the staged tree: pure arithmetic, any
//! thread.
//!
//! With 4 KiB blocks and 256-byte inodes the image needs, in blocks:
//!
//! - file data: each distinct inode's size rounded up to a block (hard
//!   links counted once);
//! - directories: `ceil((24 + Σ (8 + name rounded up to 4)) / 4096)` per
//!   directory (ext4 `dirent` size), plus one htree index block when that
//!   is more than one block;
//! - symlinks whose target does not fit in the inode (60 bytes or more):
//!   one block each; entries with xattrs: one block each (the in-inode
//!   space of a 256-byte inode is small);
//! - slack: [`SLACK_PERCENT`] of the above (extent index blocks, block
//!   group boundaries, mkfs' placement);
//! - the inode tables: `inodes × 256` bytes, with `inodes` = entries plus
//!   the mount points and ext4's reserved inodes, plus
//!   [`INODE_SLACK_PERCENT`];
//! - fixed metadata: [`FIXED_OVERHEAD`] (superblock copies, group
//!   descriptors, reserved GDT blocks, bitmaps, `lost+found`), plus the
//!   journal when asked;
//! - the caller's headroom, then rounded up to a MiB, at least the
//!   caller's minimum.
//!
//! The file is sparse, so overestimating costs little; underestimating
//! makes `mkfs.ext4 -d` fail, and the builder then retries once with
//! twice the size.

/// Block size of the images we build.
pub const BLOCK: u64 = 4096;
/// Inode size of the images we build (room for 64-bit times).
pub const INODE_SIZE: u64 = 256;
/// Extra blocks on top of the counted ones, in percent.
pub const SLACK_PERCENT: u64 = 10;
/// Extra inodes on top of the counted ones, in percent.
pub const INODE_SLACK_PERCENT: u64 = 10;
/// ext4's reserved inodes (1 to 10), the first regular one, lost+found.
pub const RESERVED_INODES: u64 = 16;
/// Fixed metadata allowance.
pub const FIXED_OVERHEAD: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// What the tree walk counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeCount {
    /// Paths in the tree, the root included (each needs an inode; hard
    /// links are counted per path, an overestimate).
    pub entries: u64,
    /// Data blocks of distinct regular files.
    pub file_blocks: u64,
    /// Directory blocks (see the module docs).
    pub dir_blocks: u64,
    /// Symlinks with a target of 60 bytes or more.
    pub long_symlinks: u64,
    /// Entries with at least one xattr.
    pub xattr_entries: u64,
    /// Bytes of distinct regular files.
    pub data_bytes: u64,
}

impl TreeCount {
    /// Adds one directory of `names` (their lengths in bytes).
    pub fn add_dir(&mut self, names: impl IntoIterator<Item = usize>) {
        let bytes: u64 = 24
            + names
                .into_iter()
                .map(|n| 8 + (n as u64).div_ceil(4) * 4)
                .sum::<u64>();
        let blocks = bytes.div_ceil(BLOCK).max(1);
        self.dir_blocks += if blocks > 1 { blocks + 1 } else { blocks };
    }

    /// Adds one distinct regular file of `size` bytes.
    pub fn add_file(&mut self, size: u64) {
        self.file_blocks += size.div_ceil(BLOCK);
        self.data_bytes += size;
    }
}

/// The image's size in bytes and its inode count (`mkfs.ext4 -N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub size_bytes: u64,
    pub inodes: u64,
}

/// Sizes the image for `count` (+ `extra_inodes` for directories the
/// builder adds), with `headroom` bytes free, at least `min_bytes`, and a
/// journal of `journal_bytes` (0: none).
pub fn plan(
    count: &TreeCount,
    extra_inodes: u64,
    headroom: u64,
    min_bytes: u64,
    journal_bytes: u64,
) -> Plan {
    let inodes =
        (count.entries + extra_inodes + RESERVED_INODES) * (100 + INODE_SLACK_PERCENT) / 100 + 64;
    let blocks = count.file_blocks + count.dir_blocks + count.long_symlinks + count.xattr_entries;
    let blocks = blocks * (100 + SLACK_PERCENT) / 100;
    let bytes = blocks * BLOCK + inodes * INODE_SIZE + FIXED_OVERHEAD + journal_bytes + headroom;
    let size_bytes = bytes.div_ceil(MIB).max(min_bytes.div_ceil(MIB)) * MIB;
    Plan { size_bytes, inodes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories() {
        let mut c = TreeCount::default();
        c.add_dir([]);
        assert_eq!(c.dir_blocks, 1);
        // 300 names of 20 bytes: 24 + 300 × 28 = 8424 bytes, 3 blocks + index.
        c.add_dir(std::iter::repeat_n(20, 300));
        assert_eq!(c.dir_blocks, 1 + 4);
    }

    #[test]
    fn files_round_up_to_blocks() {
        let mut c = TreeCount::default();
        for s in [0, 1, 4096, 4097] {
            c.add_file(s);
        }
        assert_eq!(c.file_blocks, 1 + 1 + 2);
        assert_eq!(c.data_bytes, 8194);
    }

    #[test]
    fn minimum_and_rounding() {
        let c = TreeCount {
            entries: 3,
            ..Default::default()
        };
        let p = plan(&c, 7, 0, 32 * MIB, 0);
        assert_eq!(p.size_bytes, 32 * MIB);
        assert_eq!(p.inodes, (3 + 7 + 16) * 110 / 100 + 64);
        let p = plan(&c, 7, 0, 0, 0);
        assert_eq!(
            p.size_bytes,
            5 * MIB,
            "fixed 4 MiB + inode tables, rounded up"
        );
    }

    #[test]
    fn grows_with_the_tree() {
        let c = TreeCount {
            entries: 100_000,
            file_blocks: 250_000, // ~1 GiB
            dir_blocks: 2_000,
            long_symlinks: 500,
            xattr_entries: 10,
            data_bytes: 1 << 30,
        };
        let p = plan(&c, 7, 16 * MIB, 64 * MIB, 0);
        let counted = (250_000 + 2_000 + 500 + 10) * BLOCK;
        assert!(p.size_bytes > counted + 100_000 * INODE_SIZE + 16 * MIB);
        assert!(
            p.size_bytes < counted * 13 / 10 + 100 * MIB,
            "{}",
            p.size_bytes
        );
        assert_eq!(p.size_bytes % MIB, 0);
        let with_journal = plan(&c, 7, 16 * MIB, 64 * MIB, 64 * MIB);
        assert_eq!(with_journal.size_bytes, p.size_bytes + 64 * MIB);
    }
}
