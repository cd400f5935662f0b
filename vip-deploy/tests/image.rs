//! The OCI archive `cargo xtask image` writes (`cargo xtask test` builds it first and
//! passes its path in `VIPLAB_IMAGE_ARCHIVE`): the agent alone, statically linked, run as
//! `/vip-agent run`, and reproducible. Inspected with skopeo, as a registry client would.

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

fn archive() -> PathBuf {
    let path = std::env::var_os("VIPLAB_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::root().join("target/image/vip-agent-oci.tar"));
    assert!(path.exists(), "{} is missing: run `cargo xtask image` (or set VIPLAB_IMAGE_ARCHIVE)", path.display());
    path
}

/// The second packing `cargo xtask image` makes to prove the digest reproducible.
fn rebuilt() -> PathBuf {
    let path = archive().parent().unwrap().join("rebuild/vip-agent-oci.tar");
    assert!(path.exists(), "{} is missing: run `cargo xtask image`", path.display());
    path
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn skopeo(args: &[&str], archive: &Path) -> Value {
    let reference = format!("oci-archive:{}", archive.display());
    let out = run(Command::new("skopeo").arg("inspect").args(args).arg(reference));
    serde_json::from_slice(&out).expect("skopeo prints JSON")
}

/// The one layer, gzip-compressed, read out of the archive.
fn layer(archive: &Path) -> Vec<u8> {
    let manifest = skopeo(&["--raw"], archive);
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let digest = layers[0]["digest"].as_str().unwrap();
    let blob = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    run(Command::new("tar").arg("-xOf").arg(archive).arg(blob))
}

/// `tar` reading the layer from stdin with `args`.
fn tar_layer(args: &[&str], layer: &[u8]) -> Vec<u8> {
    let mut child = Command::new("tar")
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    // Fed from another thread: tar writes its output while it reads, and a full pipe on
    // either side would stall both.
    let mut stdin = child.stdin.take().unwrap();
    let input = layer.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "tar {args:?}: {}", out.status);
    out.stdout
}

#[test]
fn image_runs_the_agent_as_its_entrypoint() {
    let config = skopeo(&["--config"], &archive());
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/vip-agent", "run"]), "{config}");
    assert!(config["config"].get("Cmd").is_none(), "{config}");
    assert_eq!((config["os"].as_str(), config["architecture"].as_str()), (Some("linux"), Some("amd64")));
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");
    assert_eq!(config["rootfs"]["diff_ids"].as_array().map(Vec::len), Some(1));
}

#[test]
fn the_single_layer_holds_only_a_static_agent_owned_by_root() {
    let layer = layer(&archive());
    let listing = String::from_utf8(tar_layer(&["-tvz", "--numeric-owner"], &layer)).unwrap();
    let entries: Vec<&str> = listing.lines().collect();
    assert_eq!(entries.len(), 1, "only vip-agent in the layer:\n{listing}");
    let fields: Vec<&str> = entries[0].split_whitespace().collect();
    assert_eq!(fields[0], "-rwxr-xr-x", "{listing}");
    assert_eq!(fields[1], "0/0", "{listing}");
    assert_eq!(fields[3], "1970-01-01", "{listing}");
    assert_eq!(*fields.last().unwrap(), "vip-agent", "{listing}");
    let binary = tar_layer(&["-xzO", "vip-agent"], &layer);
    assert!(binary.starts_with(b"\x7fELF"), "not an ELF file");
    assert!(!has_interpreter(&binary), "vip-agent asks for a dynamic loader: the empty base has none");
}

#[test]
fn the_agent_runs_with_nothing_else_in_its_root() {
    // The layer unpacked alone and chrooted into: no libc, no loader, no /proc. `--version`
    // touches none of them; a dynamically linked binary would fail to exec here.
    let root = std::env::temp_dir().join(format!("vip-deploy-rootfs-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let root_arg = root.to_str().unwrap().to_owned();
    tar_layer(&["-xz", "-C", &root_arg], &layer(&archive()));
    let out = Command::new("chroot").arg(&root).args(["/vip-agent", "--version"]).output().expect("chroot");
    std::fs::remove_dir_all(&root).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    // The version names the commit too: two builds of one version number are told apart.
    assert!(stdout.starts_with("vip-agent ") && stdout.contains("(commit "), "{stdout}");
}

#[test]
fn two_packings_of_the_agent_have_the_same_digest() {
    let (a, b) = (archive(), rebuilt());
    let digest = |p: &Path| skopeo(&[], p)["Digest"].as_str().expect("Digest").to_owned();
    let first = digest(&a);
    assert!(first.starts_with("sha256:"), "{first}");
    assert_eq!(first, digest(&b));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "the archives differ byte-wise");
}

/// Whether an ELF64 little-endian file has a `PT_INTERP` program header.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = usize::from(u16::from_le_bytes([elf[0x36], elf[0x37]]));
    let phnum = usize::from(u16::from_le_bytes([elf[0x38], elf[0x39]]));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}
