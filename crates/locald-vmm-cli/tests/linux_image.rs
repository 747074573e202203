//! Real-Linux tier, OCI images: test images built by the test (layers with
//! whiteouts, an opaque directory and hard links, gzip, zstd and plain
//! layers; a scratch image holding one static binary), served by a real
//! `docker-registry` on loopback (pushed with `skopeo`) and given as an OCI
//! layout and a `docker save` archive, then booted with `run --image`.
//! Each boot checks what the guest did: output, exit code, user, working
//! directory, environment, hostname, the layers' effects, a writable root
//! over a cached base that never changes. Skips only without /dev/kvm.

mod common;

// The registry harness of locald-image's own tests (it brings its own
// copy of the skip function, which `common` also loads).
#[path = "../../image/tests/support/mod.rs"]
#[allow(clippy::duplicate_mod)]
mod support;

use common::*;
use locald_image::testing::{
    build_image, docker_archive, BuiltImage, Comp, ConfigSpec, Entry, ImageSpec, OciLayout, TempDir,
};
use locald_image::Arch;

use std::path::Path;
use std::process::{Command, Output};

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_locald-vmm"))
}

fn run(args: &[&str]) -> Output {
    let out = vmm()
        .args(["run", "--agent-timeout", "300", "--timeout", "300"])
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "run {args:?}: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_file(p: &Path) -> String {
    host("sha256sum", &[p.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A busybox image: a gzip base (busybox, passwd/group, files, a hard
/// link, a directory later made opaque), a zstd layer (a whiteout, the
/// opaque directory, a new file) and a plain layer; runs as `app`.
fn busybox_image() -> BuiltImage {
    let bb = std::fs::read("/bin/busybox").expect("busybox-static (scripts/setup-host.sh)");
    let script = "echo \"who=$(id -u):$(id -g) home=$HOME host=$(hostname) pwd=$(pwd) \
                  mode=$MODE\"; ls /srv; cat /etc/motd; [ -e /etc/gone ] || echo gone-ok; \
                  [ /bin/app-link -ef /bin/sh ] && echo hardlink-ok; eval \"echo $1\"; exit 7";
    build_image(&ImageSpec {
        arch: Arch::Amd64,
        config: ConfigSpec {
            entrypoint: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                script.into(),
                "sh".into(),
            ]),
            cmd: Some(vec!["default-cmd".into()]),
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
            exposed_ports: vec!["8080/tcp".into()],
            ..ConfigSpec::default()
        },
        layers: vec![
            (
                vec![
                    Entry::dir("bin"),
                    Entry::exe("bin/sh", &bb),
                    Entry::hardlink("bin/app-link", "bin/sh"),
                    Entry::symlink("bin/id", "sh"),
                    Entry::symlink("bin/ls", "sh"),
                    Entry::symlink("bin/cat", "sh"),
                    Entry::symlink("bin/hostname", "sh"),
                    Entry::symlink("bin/touch", "sh"),
                    Entry::symlink("bin/tr", "sh"),
                    Entry::dir("etc"),
                    Entry::file(
                        "etc/passwd",
                        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
                    ),
                    Entry::file("etc/group", "root:x:0:\napp:x:1001:\n"),
                    Entry::file("etc/motd", "motd-layer-1\n"),
                    Entry::file("etc/gone", "whited out by layer 2\n"),
                    Entry::dir("srv"),
                    Entry::file("srv/old", "hidden by the opaque dir\n"),
                ],
                Comp::Gzip,
            ),
            (
                vec![
                    Entry::whiteout("etc/gone"),
                    Entry::opaque("srv"),
                    Entry::file("srv/new", "layer 2\n"),
                ],
                Comp::Zstd,
            ),
            (vec![Entry::file("etc/motd", "motd-layer-3\n")], Comp::None),
        ],
    })
}

/// A scratch image: one static binary, nothing else.
fn scratch_image(dir: &Path) -> BuiltImage {
    let src = dir.join("scratch.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(int c, char **v) { printf(\"scratch ok %s\\n\", c > 1 ? v[1] : \"-\"); return 3; }\n",
    )
    .unwrap();
    let bin = dir.join("scratch");
    let cc = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run gcc (scripts/setup-host.sh installs it)");
    assert!(cc.status.success(), "{}", text(&cc.stderr));
    build_image(&locald_image::testing::scratch_image(&bin, Arch::Amd64))
}

#[test]
fn images_from_a_registry_a_layout_and_an_archive_boot() {
    if !kvm_present() {
        return;
    }
    let Some(registry) = support::RealRegistry::start() else {
        return;
    };
    let tmp = TempDir::new("image-boot");
    let bb = busybox_image();
    let layout_dir = tmp.path().join("layout");
    let mut layout = OciLayout::create(&layout_dir);
    layout.add_image(&bb, Some("v1"));
    let name = format!("locald-test/bb-{}", std::process::id());
    registry.push(&layout_dir, "v1", &name, false);
    let reference = format!("{}/{name}:v1", registry.addr);

    // 1. From the registry: the image's own Entrypoint + Cmd, as its user.
    let out = run(&["--image", &reference]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    let host_name = format!("bb-{}", std::process::id());
    assert!(
        stdout.contains(&format!(
            "who=1000:1001 home=/home/app host={host_name} pwd=/srv mode=image"
        )),
        "{stdout}"
    );
    // The opaque /srv shows only layer 2's file; layer 3's motd wins; the
    // whiteout removed /etc/gone; the hard link survived.
    assert!(
        stdout.contains("\nnew\n") && !stdout.contains("old"),
        "{stdout}"
    );
    for want in ["motd-layer-3", "gone-ok", "hardlink-ok", "default-cmd"] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }

    // 2. The same image from the cache: flags override, the root is
    // writable, the cached base disk never changes.
    let rootfs = {
        let out = vmm()
            .args(["pull", "--rootfs", &reference])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let line = text(&out.stdout);
        std::path::PathBuf::from(line.split_whitespace().nth(2).unwrap())
    };
    let before = sha256_file(&rootfs);
    let out = run(&[
        "--image",
        &reference,
        "--user",
        "0",
        "--hostname",
        "custom",
        "-e",
        "MODE=flag",
        "--workdir",
        "/",
        "--",
        "wrote-$(touch /srv/written && ls /srv | tr '\\n' ,)",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    assert!(
        stdout.contains("who=0:0 home=/root host=custom pwd=/ mode=flag"),
        "{stdout}"
    );
    assert!(stdout.contains("wrote-new,written,"), "{stdout}");
    assert_eq!(sha256_file(&rootfs), before, "the cached root disk changed");

    // 3. An OCI layout directory and a docker-save archive (scratch image).
    let out = run(&["--image", layout_dir.to_str().unwrap(), "--", "from-layout"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(text(&out.stdout).contains("from-layout"));
    let scratch = scratch_image(tmp.path());
    let archive = tmp.path().join("scratch.tar");
    docker_archive(&scratch, "scratch:latest", &archive);
    let out = run(&["--image", archive.to_str().unwrap(), "--", "arg1"]);
    assert_eq!(text(&out.stdout), "scratch ok arg1\n");
    assert_eq!(out.status.code(), Some(3));

    // 4. The cache: listed with sizes, removed, pruned.
    let out = vmm().arg("images").output().unwrap();
    let list = text(&out.stdout);
    assert!(list.contains(&reference), "{list}");
    for image in [&reference, &archive.display().to_string()] {
        let rm = vmm().args(["image", "rm", image]).output().unwrap();
        assert!(rm.status.success(), "{}", text(&rm.stderr));
    }
    let out = vmm().args(["image", "prune"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !rootfs.exists(),
        "prune left the root disk of a removed image"
    );
    let list = text(&vmm().arg("images").output().unwrap().stdout);
    assert!(!list.contains(&reference), "{list}");

    // 5. Bad input: one clear line, exit 125, nothing cached.
    let missing = format!("{}/{name}:nope", registry.addr);
    let out = vmm().args(["run", "--image", &missing]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nope"), "{err}");
    let list = text(&vmm().arg("images").output().unwrap().stdout);
    assert!(!list.contains(":nope"), "{list}");
}
