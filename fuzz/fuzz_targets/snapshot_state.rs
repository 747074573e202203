//! Fuzzes the snapshot state file's parser: the envelope (magic, version,
//! length, SHA-256) and the body a restore builds a VM from. The first
//! input byte picks the mode: even, the input is a whole state file (it
//! must be refused cleanly); odd, the rest is a body wrapped in a valid
//! envelope, so the JSON decoder and the checks that run before any KVM
//! call (`SavedMachine::validate`, the queue and UART restores) see it.
//!
//! Oracles, besides "no panic": a body that decodes and validates
//! re-encodes to a state file that decodes and validates again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use locald_vmm::kvm::snapshot::SavedMachine;
use locald_vmm::snapshot::format;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let body: serde_json::Value = match serde_json::from_slice(rest) {
            Ok(v) => v,
            Err(_) => {
                // Still a valid envelope around bytes that are not JSON.
                let mut f = format::encode(&serde_json::Value::Null);
                f.truncate(format::HEADER);
                let _ = format::decode::<SavedMachine>(&f);
                return;
            }
        };
        format::encode(&body)
    };
    let Ok(saved) = format::decode::<SavedMachine>(&file) else {
        return;
    };
    if saved.validate().is_err() {
        return;
    }
    for t in &saved.virtio {
        for q in &t.queues {
            assert!(q.to_queue(q.max_size).is_ok());
        }
    }
    let again = format::encode(&saved);
    let back: SavedMachine = format::decode(&again).expect("re-encoded state decodes");
    back.validate().expect("re-encoded state validates");
});
