//! virtio-blk (placeholder; being written).
