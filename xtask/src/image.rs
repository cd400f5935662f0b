//! `cargo xtask image`: a statically linked vip-agent in a reproducible OCI image archive,
//! `target/image/vip-agent-oci.tar` (`skopeo copy oci-archive:... docker://...` pushes it).
//!
//! The image is the agent alone on an empty base: one layer holding `/vip-agent` (no
//! shell, no libc, no CA bundle: the agent dials 127.0.0.1 and IP backends and takes
//! its CAs from the service account or the kubeconfig), entrypoint `/vip-agent run`.
//! Same binary in, same digest out: every timestamp is the epoch, entries are sorted,
//! owners are 0:0 with fixed modes, gzip stores no name or time, and the JSON is written
//! in a fixed order. To prove it, the archive is packed twice (the second time from a
//! copy of the binary with another mtime, in another directory) and the two digests
//! must agree; the second archive stays in `target/image/rebuild/` for the tests.
//!
//! Static linking: glibc with `+crt-static` (static-pie), because the agent does not
//! build for musl yet (vip-agent's netdev passes `libc::SIOC*` constants, `c_ulong` on
//! musl, where `libc::Ioctl` is `c_int`). A static glibc binary cannot load NSS modules,
//! so it resolves no host names through NSS; the manifests give it only IP addresses.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{cargo, status, Result};

/// The target the agent is linked statically for.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Rust flags for `TARGET` only: build scripts and proc macros (built for the host, and
/// loaded as shared objects) must stay dynamic, and so must the eBPF build aya-build runs.
const TARGET_RUSTFLAGS: (&str, &str) =
    ("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static");
/// The image's name without tag, as the manifests' default `--image` has it.
pub const REPOSITORY: &str = "ghcr.io/vip-project/vip-agent";
/// Creation time of every file and of the image: the epoch, so that a rebuild of the
/// same binary gives the same digest.
const EPOCH_RFC3339: &str = "1970-01-01T00:00:00Z";
/// Options that make GNU tar's output depend on the file contents and names only.
const TAR_REPRODUCIBLE: &[&str] = &[
    "--sort=name",
    "--owner=0",
    "--group=0",
    "--numeric-owner",
    "--mtime=@0",
    "--format=posix",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
];
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The cargo target directory (`CARGO_TARGET_DIR` when set, else `target/`).
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| crate::root().join("target"))
}

/// Where `cargo xtask image` writes the archive.
pub fn archive_path() -> PathBuf {
    target_dir().join("image/vip-agent-oci.tar")
}

/// Builds the static agent and packs it twice; returns the archive's path.
pub fn image(toolchain: &str) -> Result<PathBuf> {
    println!("xtask: building a static vip-agent (release, {TARGET} +crt-static)");
    let (var, flags) = TARGET_RUSTFLAGS;
    status(cargo(toolchain).env(var, flags).args(["build", "--release", "-p", "vip-agent", "--target", TARGET]))?;
    let binary = target_dir().join(TARGET).join("release/vip-agent");
    check_static(&binary)?;
    let out = target_dir().join("image");
    let archive = archive_path();
    let digest = pack(&binary, &out.join("work"), &archive)?;
    // The second packing: a copy with a fresh mtime, another work directory.
    let copy = out.join("rebuild-input/vip-agent");
    fs::create_dir_all(copy.parent().unwrap_or(&out)).map_err(|e| format!("creating {}: {e}", out.display()))?;
    fs::copy(&binary, &copy).map_err(|e| format!("copying {}: {e}", binary.display()))?;
    let again = pack(&copy, &out.join("rebuild-work"), &out.join("rebuild/vip-agent-oci.tar"))?;
    if again != digest {
        return Err(format!("the image is not reproducible: {digest} then {again} from the same binary"));
    }
    fs::write(out.join("vip-agent-oci.digest"), format!("{digest}\n")).map_err(|e| format!("writing digest: {e}"))?;
    println!("xtask: wrote {} ({digest}, reproduced)", archive.display());
    println!("xtask: push with: skopeo copy oci-archive:{} docker://{REPOSITORY}:{}", archive.display(), version());
    Ok(archive)
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Refuses a dynamically linked binary: it would not start on an empty base.
fn check_static(binary: &Path) -> Result<()> {
    let elf = fs::read(binary).map_err(|e| format!("reading {}: {e}", binary.display()))?;
    if has_interpreter(&elf)? {
        return Err(format!("{} asks for a dynamic loader (PT_INTERP): not static", binary.display()));
    }
    Ok(())
}

/// Whether an ELF64 little-endian file has a `PT_INTERP` program header.
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("not an ELF64 little-endian file".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Err("truncated ELF header".into());
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff).map_err(|_| "bad e_phoff")? + i * usize::from(phentsize);
        if u32_at(at).ok_or("truncated program headers")? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Packs `binary` into an OCI image archive at `archive`, using `work` as scratch;
/// returns the manifest digest (`sha256:...`), which is the image's digest.
fn pack(binary: &Path, work: &Path, archive: &Path) -> Result<String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    if work.exists() {
        fs::remove_dir_all(work).map_err(|e| io("removing", work, e))?;
    }
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&rootfs).map_err(|e| io("creating", &rootfs, e))?;
    fs::create_dir_all(&blobs).map_err(|e| io("creating", &blobs, e))?;
    fs::copy(binary, rootfs.join("vip-agent")).map_err(|e| io("copying", binary, e))?;

    // The layer: one file, mode 0755.
    let layer_tar = work.join("layer.tar");
    status(
        Command::new("tar")
            .args(TAR_REPRODUCIBLE)
            .arg("--mode=0755")
            .arg("--create")
            .arg("--file")
            .arg(&layer_tar)
            .arg("--directory")
            .arg(&rootfs)
            .arg("vip-agent"),
    )?;
    let diff_id = sha256(&layer_tar)?;
    let layer_gz = work.join("layer.tar.gz");
    let gz = fs::File::create(&layer_gz).map_err(|e| io("creating", &layer_gz, e))?;
    // -n: no file name or time in the gzip header.
    status(Command::new("gzip").args(["-9", "-n", "-c"]).arg(&layer_tar).stdout(gz))?;
    let layer = blob(&blobs, &fs::read(&layer_gz).map_err(|e| io("reading", &layer_gz, e))?)?;

    let config = format!(
        concat!(
            "{{\"created\":\"{epoch}\",\"architecture\":\"amd64\",\"os\":\"linux\",",
            "\"config\":{{\"Entrypoint\":[\"/vip-agent\",\"run\"],\"WorkingDir\":\"/\",",
            "\"Labels\":{{\"org.opencontainers.image.title\":\"vip-agent\",",
            "\"org.opencontainers.image.version\":\"{version}\"}}}},",
            "\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"{diff_id}\"]}},",
            "\"history\":[{{\"created\":\"{epoch}\",\"created_by\":\"cargo xtask image\"}}]}}"
        ),
        epoch = EPOCH_RFC3339,
        version = version(),
        diff_id = diff_id,
    );
    let config = blob(&blobs, config.as_bytes())?;
    let manifest = format!(
        concat!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{mm}\",",
            "\"config\":{{\"mediaType\":\"{mc}\",\"digest\":\"{cd}\",\"size\":{cs}}},",
            "\"layers\":[{{\"mediaType\":\"{ml}\",\"digest\":\"{ld}\",\"size\":{ls}}}]}}"
        ),
        mm = MEDIA_MANIFEST,
        mc = MEDIA_CONFIG,
        cd = config.digest,
        cs = config.size,
        ml = MEDIA_LAYER,
        ld = layer.digest,
        ls = layer.size,
    );
    let manifest = blob(&blobs, manifest.as_bytes())?;
    let index = format!(
        concat!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{mi}\",\"manifests\":[{{\"mediaType\":\"{mm}\",",
            "\"digest\":\"{md}\",\"size\":{ms},\"annotations\":{{",
            "\"io.containerd.image.name\":\"{repo}:{version}\",",
            "\"org.opencontainers.image.ref.name\":\"{version}\"}}}}]}}"
        ),
        mi = MEDIA_INDEX,
        mm = MEDIA_MANIFEST,
        md = manifest.digest,
        ms = manifest.size,
        repo = REPOSITORY,
        version = version(),
    );
    write(&layout.join("index.json"), index.as_bytes())?;
    write(&layout.join("oci-layout"), b"{\"imageLayoutVersion\":\"1.0.0\"}")?;

    if let Some(dir) = archive.parent() {
        fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    }
    status(
        Command::new("tar")
            .args(TAR_REPRODUCIBLE)
            .arg("--mode=u=rwX,go=rX")
            .arg("--create")
            .arg("--file")
            .arg(archive)
            .arg("--directory")
            .arg(&layout)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    Ok(manifest.digest)
}

/// A content-addressed blob written into the layout.
struct Blob {
    digest: String,
    size: usize,
}

fn blob(blobs: &Path, bytes: &[u8]) -> Result<Blob> {
    let scratch = blobs.join("incoming");
    write(&scratch, bytes)?;
    let digest = sha256(&scratch)?;
    let hex = digest.trim_start_matches("sha256:");
    let path = blobs.join(hex);
    fs::rename(&scratch, &path).map_err(|e| format!("renaming {}: {e}", scratch.display()))?;
    Ok(Blob { digest, size: bytes.len() })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `sha256:<hex>` of a file, from coreutils' sha256sum.
fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().map_err(|e| format!("running sha256sum: {e}"))?;
    if !out.status.success() {
        return Err(format!("sha256sum {} failed: {}", path.display(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().filter(|h| h.len() == 64).ok_or("sha256sum printed no digest")?;
    Ok(format!("sha256:{hex}"))
}
