//! Real-Linux tier for virtio-net: boots the default guest with a network
//! card, once over a TAP and once over passt, each inside a network
//! namespace this test creates (nothing can leave the machine: the only
//! interfaces there are loopback, the TAP, and a veth pair whose far end
//! forwards nothing). One boot per backend checks many things.
//!
//! Skips, loudly, without /dev/kvm, /dev/net/tun, root (netns) or passt.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{skip, Why};

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Option<Self> {
        let name = format!("ldnt-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            skip(Why::NotRoot("network namespaces (ip netns add)"));
            return None;
        }
        let ns = NetNs(name);
        ns.ip("link set lo up");
        Some(ns)
    }

    fn ip(&self, args: &str) {
        let st = Command::new("ip")
            .args(["-n", &self.0])
            .args(args.split_whitespace())
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args}", self.0);
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd; affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            f()
        })
    }

    /// The CLI inside the namespace.
    fn vmm(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_locald-vmm")])
            .args(args)
            .env("LOCALD_VMM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run locald-vmm")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn output(child: Child) -> (Option<i32>, String, String) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    (out.status.code(), stdout, stderr)
}

/// GETs `/` from `addr` until it answers (or `limit` passes).
fn http_get_until(addr: &str, limit: Duration) -> Option<String> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(mut s) =
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
        {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut body = String::new();
            if s.read_to_string(&mut body).is_ok() && body.contains("200") {
                return Some(body);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

fn prerequisites(need_tun: bool, need_passt: bool) -> bool {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip(Why::NoKvm);
        return false;
    }
    if need_tun && !std::path::Path::new("/dev/net/tun").exists() {
        skip(Why::Missing("/dev/net/tun"));
        return false;
    }
    if need_passt && Command::new("passt").arg("--version").output().is_err() {
        skip(Why::Missing("passt (apt install passt)"));
        return false;
    }
    true
}

/// One boot over a TAP in a private namespace: static address; the guest
/// pings the host side, TCP-connects to a server in the namespace, and
/// serves HTTP that the namespace's host side fetches.
#[test]
fn tap_guest_pings_connects_and_serves() {
    if !prerequisites(true, false) {
        return;
    }
    let Some(ns) = NetNs::new("tap") else {
        return;
    };
    ns.ip("tuntap add ldtap0 mode tap");
    ns.ip("addr add 10.77.0.1/24 dev ldtap0");
    ns.ip("link set ldtap0 up");
    // A TCP server on the host side of the TAP.
    let server = ns.run(|| {
        let l = TcpListener::bind("10.77.0.1:7001").unwrap();
        let (mut s, peer) = l.accept().unwrap();
        s.write_all(b"tcp-ok-from-netns\n").unwrap();
        peer.ip().to_string()
    });
    let script = r#"
        echo "link: $(cat /sys/class/net/eth0/operstate)"
        ip addr show eth0
        ping -c 2 -W 5 10.77.0.1 && echo PING-OK
        echo hi | nc 10.77.0.1 7001
        mkdir -p /www && echo guest-http-ok > /www/index.html
        httpd -p 8080 -h /www
        echo SERVING
        # Wait for the host's go-ahead (after it fetched our page).
        nc -l -p 9999 && echo DONE
    "#;
    let child = ns.vmm(&[
        "run",
        "--net",
        "tap=ldtap0,ip=10.77.0.2/24,gw=10.77.0.1,mac=02:00:00:77:00:02",
        "--timeout",
        "280",
        "--",
        "sh",
        "-c",
        script,
    ]);
    // The host side fetches the guest's page, then releases the guest.
    let client = ns.run(|| {
        let page = http_get_until("10.77.0.2:8080", Duration::from_secs(240));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(mut s) = TcpStream::connect("10.77.0.2:9999") {
                let _ = s.write_all(b"go\n");
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        page
    });
    let (code, stdout, _stderr) = output(child);
    let page = client.join().unwrap();
    assert_eq!(code, Some(0));
    assert!(stdout.contains("02:00:00:77:00:02"), "MAC from --net");
    assert!(stdout.contains("inet 10.77.0.2/24"), "static address");
    assert!(stdout.contains("PING-OK"), "ping over the TAP");
    assert!(
        stdout.contains("tcp-ok-from-netns"),
        "TCP to the netns server"
    );
    assert_eq!(server.join().unwrap(), "10.77.0.2");
    assert!(
        page.as_deref()
            .unwrap_or_default()
            .contains("guest-http-ok"),
        "guest HTTP server reached from the host side: {page:?}"
    );
    assert!(stdout.contains("DONE"));
}

/// One boot over passt in a private namespace: DHCP from passt, the guest
/// reaches a server on the namespace's loopback through the gateway
/// address, serves HTTP published on host loopback with passt's mapping,
/// and when passt is killed the link goes down while the VM keeps running.
#[test]
fn passt_guest_dhcp_loopback_publish_and_link_down() {
    if !prerequisites(false, true) {
        return;
    }
    let Some(ns) = NetNs::new("passt") else {
        return;
    };
    // passt's template interface: a veth whose peer forwards nothing.
    ns.ip("link add ldv0 type veth peer name ldv1");
    ns.ip("addr add 10.232.0.2/24 dev ldv0");
    ns.ip("link set ldv0 up");
    ns.ip("link set ldv1 up");
    ns.ip("route add default via 10.232.0.1 dev ldv0");
    let server = ns.run(|| {
        let l = TcpListener::bind("127.0.0.1:7002").unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"loopback-ok-through-passt\n").unwrap();
    });
    // Bulk guest → host with `offload=on`: the guest's TSO packets are cut
    // into frames by the VMM (passt takes no offloads); every byte must
    // arrive in order.
    const BULK: usize = 256 * 1024;
    let bulk = ns.run(|| {
        let l = TcpListener::bind("127.0.0.1:7003").unwrap();
        // Never hang the test: the VM's own --timeout is 500 s.
        l.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(520) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("the guest never connected for the bulk upload: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut got = vec![0u8; BULK];
        s.read_exact(&mut got).unwrap();
        let want: Vec<u8> = b"0123456789abcde\n"
            .iter()
            .copied()
            .cycle()
            .take(BULK)
            .collect();
        let verdict = if got == want {
            "bulk-ok"
        } else {
            "bulk-corrupt"
        };
        s.write_all(format!("{verdict} {}\n", got.len()).as_bytes())
            .unwrap();
        got == want
    });
    let script = r#"
        ip addr show eth0
        ip route
        echo "features=$(cat /sys/class/net/eth0/device/features)"
        echo hi | nc 10.232.0.1 7002
        # Wait for the server's verdict, not for nc's exit: this passt may
        # never send its FIN after the guest half-closed (docs/virtio-net.md).
        yes 0123456789abcde | head -c 262144 | nc 10.232.0.1 7003 > /tmp/bulk &
        i=0
        while ! grep -q bulk- /tmp/bulk && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
        cat /tmp/bulk
        kill $! 2>/dev/null
        mkdir -p /www && echo guest-http-via-passt > /www/index.html
        httpd -p 8080 -h /www
        echo SERVING
        i=0
        while [ "$(cat /sys/class/net/eth0/carrier)" = 1 ] && [ $i -lt 1200 ]; do
            sleep 0.2; i=$((i+1))
        done
        echo "carrier=$(cat /sys/class/net/eth0/carrier)"
    "#;
    let child = ns.vmm(&[
        "run",
        "--net",
        "user,publish=18081:8080,offload=on,host-loopback=on",
        "--timeout",
        "500",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let vmm_pid = child.id();
    let client = ns.run(|| http_get_until("127.0.0.1:18081", Duration::from_secs(240)));
    let page = client.join().unwrap();
    // Kill passt, the child of the VMM (`ip netns exec` became the VMM).
    // Its only child (Debian's `passt` execs `passt.avx2`, so match by
    // parent, not name).
    let pids = Command::new("pgrep")
        .args(["-P", &vmm_pid.to_string()])
        .output()
        .unwrap();
    let passt_pid = String::from_utf8_lossy(&pids.stdout).trim().to_string();
    if passt_pid.is_empty() || page.is_none() {
        let _ = Command::new("kill").arg(vmm_pid.to_string()).status();
    }
    if passt_pid.is_empty() {
        let (code, stdout, stderr) = output(child);
        panic!("passt does not run under the VMM (exit {code:?}):\n{stdout}\n{stderr}");
    }
    Command::new("kill")
        .args(["-KILL", &passt_pid])
        .status()
        .unwrap();
    let (code, stdout, stderr) = output(child);
    server.join().unwrap();
    assert!(bulk.join().unwrap(), "bulk upload corrupted:\n{stdout}");
    assert!(stdout.contains(&format!("bulk-ok {BULK}")), "{stdout}");
    // The driver took the offloads: CSUM (bit 0) and HOST_TSO4 (bit 11).
    let feats = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("features="))
        .unwrap_or_default();
    assert!(
        feats.get(0..1) == Some("1") && feats.get(11..12) == Some("1"),
        "guest did not negotiate CSUM/HOST_TSO4: {feats:?}"
    );
    assert!(
        page.as_deref()
            .unwrap_or_default()
            .contains("guest-http-via-passt"),
        "published guest port reached from host loopback: {page:?}"
    );
    assert!(stdout.contains("inet 10.232.0.2/24"), "DHCP lease applied");
    assert!(stdout.contains("default via 10.232.0.1"), "route from DHCP");
    assert!(
        stdout.contains("loopback-ok-through-passt"),
        "host loopback via gateway"
    );
    assert!(stdout.contains("carrier=0"), "link down after passt died");
    assert!(stderr.contains("link down"), "error logged");
    assert_eq!(code, Some(0), "the VM kept running and exited normally");
}
