//! `locald-net-bench`: in-process frame throughput of the virtio-net
//! backends, no KVM, no guest. Runs on the main thread plus, for the TAP
//! receive case, one sender thread. Everything happens inside a network
//! namespace the benchmark creates (needs root and iproute2); nothing can
//! leave the machine.
//!
//! - **TAP tx**: `Tap::send` of 64- and 1500-byte frames (with the 12-byte
//!   virtio-net header) into a TAP whose host side is up — what the device
//!   does per guest-transmitted packet. Frames carry an unused EtherType,
//!   so the host stack drops them right after the TAP.
//! - **TAP rx**: a host-side `AF_PACKET` socket injects frames into the
//!   TAP's egress as fast as it can; `Tap::recv` drains them.
//! - **passt tx**: `Passt::send` + flush over passt's stream socket (passt
//!   parses and drops each frame).
//! - **passt ARP round trips**: request → reply through passt, one at a
//!   time: the latency-bound host → guest path.
//!
//! Usage: `locald-net-bench [--secs N]` (per measurement, default 2).

use std::os::fd::AsRawFd;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use locald_vmm::devices::virtio::net::header::{HDR_LEN, MAX_PACKET};
use locald_vmm::devices::virtio::net::passt::{Passt, PasstOptions};
use locald_vmm::devices::virtio::net::tap::Tap;
use locald_vmm::devices::virtio::net::NetBackend;

fn ip(ns: &str, args: &str) {
    let st = Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .status()
        .expect("ip");
    assert!(st.success(), "ip -n {ns} {args}");
}

fn frame(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]); // to: nobody
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    p.extend_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    p.resize(HDR_LEN + len, 0xab);
    p
}

fn rate(n: u64, d: Duration) -> String {
    format!("{:>10.0} pkt/s", n as f64 / d.as_secs_f64())
}

/// Frames handed to the TAP (a full queue drops: counted apart, not as
/// sent), and frames dropped that way. Any other send error stops the
/// bench.
fn tap_tx(be: &mut dyn NetBackend, len: usize, secs: Duration) -> (u64, u64, Duration) {
    let p = frame(len);
    let t0 = Instant::now();
    let (mut n, mut dropped) = (0u64, 0u64);
    while t0.elapsed() < secs {
        for _ in 0..256 {
            match be.send(&p) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => dropped += 1,
                Err(e) => panic!("tap send: {e}"),
            }
        }
    }
    (n, dropped, t0.elapsed())
}

/// Whether `packet` (header + frame) is the bench's own frame of `len`
/// bytes, as [`frame`] builds it.
fn is_bench_frame(packet: &[u8], len: usize) -> bool {
    packet.len() == HDR_LEN + len && packet[HDR_LEN..] == frame(len)[HDR_LEN..]
}

fn passt_tx(be: &mut Passt, len: usize, secs: Duration) -> (u64, Duration) {
    let p = frame(len);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < secs {
        for _ in 0..256 {
            while be.tx_blocked() {
                let mut pfd = libc::pollfd {
                    fd: be.fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
                be.flush().expect("passt flush");
            }
            be.send(&p).expect("passt send");
            n += 1;
        }
    }
    (n, t0.elapsed())
}

/// Injects frames into `ifname`'s egress (towards our TAP reader) from a
/// packet socket, until `stop`.
fn packet_sender(ifname: &str, len: usize, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    // SAFETY: plain socket(2) call; checked below.
    let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(s >= 0, "packet socket: {}", std::io::Error::last_os_error());
    let c = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    // SAFETY: sockaddr_ll is plain data; zero is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = idx as i32;
    sa.sll_halen = 6;
    let f = &frame(len)[HDR_LEN..];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: sends from a valid slice to a valid sockaddr_ll.
        unsafe {
            libc::sendto(
                s,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
    }
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(s) };
}

/// Frames of ours received intact, other frames, elapsed time.
fn tap_rx(tap: &mut Tap, len: usize, secs: Duration) -> (u64, u64, Duration) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let name = tap.name().to_string();
    let st = stop.clone();
    let ns_file = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
    let sender = std::thread::spawn(move || {
        // SAFETY: joins the namespace of the spawning thread.
        unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
        packet_sender(&name, len, st)
    });
    let mut buf = vec![0u8; MAX_PACKET];
    let t0 = Instant::now();
    let (mut n, mut other) = (0u64, 0u64);
    while t0.elapsed() < secs {
        match tap.recv(&mut buf) {
            // Only the injected frames count (not the kernel's own IPv6
            // router solicitations and the like), and only intact ones.
            Ok(Some(got)) if is_bench_frame(&buf[..got], len) => n += 1,
            Ok(Some(_)) => other += 1,
            Ok(None) => std::hint::spin_loop(),
            Err(e) => panic!("tap recv: {e}"),
        }
    }
    let d = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    (n, other, d)
}

fn arp(mac: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[10, 233, 0, 2]);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[10, 233, 0, 1]);
    p.resize(HDR_LEN + 60, 0);
    p
}

fn passt_arp(be: &mut Passt, secs: Duration) -> (u64, Duration) {
    let mac = [2, 0, 0, 0, 0, 0x55];
    let req = arp(mac);
    let mut buf = vec![0u8; MAX_PACKET];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < secs {
        be.send(&req).expect("send");
        let t1 = Instant::now();
        loop {
            match be.recv(&mut buf).expect("recv") {
                // A reply to us, from the gateway: EtherType ARP, op 2.
                Some(len)
                    if len >= HDR_LEN + 42
                        && buf[HDR_LEN..HDR_LEN + 6] == mac
                        && buf[HDR_LEN + 12..HDR_LEN + 14] == [0x08, 0x06]
                        && buf[HDR_LEN + 20..HDR_LEN + 22] == [0, 2]
                        && buf[HDR_LEN + 28..HDR_LEN + 32] == [10, 233, 0, 1] =>
                {
                    n += 1;
                    break;
                }
                Some(_) => {}
                None => {
                    let mut pfd = libc::pollfd {
                        fd: be.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
            }
            if t1.elapsed() > Duration::from_secs(2) {
                panic!("no ARP reply from passt");
            }
        }
    }
    (n, t0.elapsed())
}

fn main() -> ExitCode {
    let mut secs = Duration::from_secs(2);
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--secs") {
        secs = Duration::from_secs_f64(args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(2.0));
    }
    let ns = format!("ldnb-{}", std::process::id());
    if !Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        eprintln!(
            "locald-net-bench needs root and iproute2 (it works in a private network namespace)"
        );
        return ExitCode::FAILURE;
    }
    ip(&ns, "link set lo up");
    ip(&ns, "tuntap add ldb0 mode tap");
    ip(&ns, "link set ldb0 up");
    ip(&ns, "link add ldv0 type veth peer name ldv1");
    ip(&ns, "addr add 10.233.0.2/24 dev ldv0");
    ip(&ns, "link set ldv0 up");
    ip(&ns, "link set ldv1 up");
    ip(&ns, "route add default via 10.233.0.1 dev ldv0");
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on a valid namespace fd; this (main) thread only.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);

    let mut tap = Tap::open(Some("ldb0")).expect("tap");
    println!("backend  direction  frame  throughput");
    for len in [64usize, 1500] {
        let (n, dropped, d) = tap_tx(&mut tap, len, secs);
        println!(
            "TAP      tx (send)  {len:>5}  {} ({dropped} dropped on a full queue, not counted)",
            rate(n, d)
        );
    }
    for len in [64usize, 1500] {
        let (n, other, d) = tap_rx(&mut tap, len, secs);
        println!(
            "TAP      rx (recv)  {len:>5}  {} ({other} other frames, not counted)",
            rate(n, d)
        );
    }
    match Passt::spawn(&PasstOptions::default()) {
        Ok(mut p) => {
            for len in [64usize, 1500] {
                let (n, d) = passt_tx(&mut p, len, secs);
                println!("passt    tx (send)  {len:>5}  {}", rate(n, d));
            }
            let (n, d) = passt_arp(&mut p, secs);
            println!(
                "passt    ARP rtt       60  {} (request→reply, one at a time)",
                rate(n, d)
            );
        }
        Err(e) => println!("passt: {e}"),
    }
    drop(tap);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    ExitCode::SUCCESS
}
