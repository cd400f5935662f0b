//! `cargo xtask setup`: bring a fresh machine to the point where the XDP object builds
//! and every test can run. Each step checks first and says what it found or did, so
//! running it again is cheap and changes nothing.

use std::{fs, process::Command};

use crate::{status, Result};

/// Debian packages to build the agent: LLVM 22 for bpf-linker (it links against the
/// system libLLVM), and the static C library (`cargo xtask image` links the agent with
/// `+crt-static`). All that `build`, `run` and `image` install: they run on the nodes
/// the agent serves, which need no lab tools.
const BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev", "libc6-dev"];

/// Debian packages the tests, the demo and the fuzzer add: the tools the network tests
/// and the demo drive (ping is the tcx lab's traffic that is not the data plane's;
/// ndisc6 and curl are the IPv6 lab's client; scapy builds the IPv6 fixtures' expected
/// frames, an implementation independent of ours; FRR and BIRD are the BGP labs'
/// routers), skopeo (the image tests inspect the OCI archive with it) and python3-venv
/// (the schema validator's virtualenv).
const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-arping",
    "iputils-ping",
    "ndisc6",
    "curl",
    "python3-scapy",
    "tcpdump",
    "ethtool",
    "util-linux",
    "nftables",
    "frr",
    "bird2",
    "skopeo",
    "python3-venv",
];

/// The LLVM major version bpf-linker is built against. The nightly that compiles the
/// eBPF crate must emit bitcode this LLVM reads, so both must agree.
pub const LLVM_MAJOR: &str = "22";
/// A dated nightly known to ship LLVM 22 (22.1.4), used when `nightly` is not LLVM 22.
const FALLBACK_NIGHTLY: &str = "nightly-2026-05-19";
/// bpf-linker release, pinned.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";
/// The offline Kubernetes schema validator (PyPI; it bundles the schemas of every
/// Kubernetes release it knows), pinned so that a new release cannot change a verdict.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Runs every step (what the tests, the demo, the benchmarks and the fuzzer need);
/// returns the rustup toolchain to build the eBPF crate with.
pub fn run() -> Result<String> {
    apt_install(LAB_PACKAGES)?;
    let toolchain = build_toolchain()?;
    bpffs()?;
    validator()?;
    println!("setup: ready (eBPF toolchain {toolchain})");
    Ok(toolchain)
}

/// Only what building the agent needs (`build`, `run`, `image`): no lab tools, routers
/// or validator on a node that is to run the agent. Returns the eBPF toolchain.
pub fn build_toolchain() -> Result<String> {
    apt_install(BUILD_PACKAGES)?;
    let toolchain = nightly()?;
    rust_src(&toolchain)?;
    bpf_linker()?;
    Ok(toolchain)
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `cargo xtask bench` needs beyond the tests' tools: the peers it measures vip
/// beside (`vip-peers`). Installed only when a bench section asks for them, so that
/// `cargo xtask test` stays lean.
pub const BENCH_PACKAGES: &[&str] = &["haproxy", "keepalived", "nftables", "ethtool"];

/// Installs whichever of `packages` are missing (idempotent).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", pkg]))
                .is_none_or(|s| !s.starts_with("ii"))
        })
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn llvm_major_of(toolchain: &str) -> Option<String> {
    let vv = output(Command::new("rustc").arg(format!("+{toolchain}")).arg("-vV"))?;
    let line = vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    line.split('.').next().map(str::to_owned)
}

/// `nightly` if it is LLVM 22, else the pinned dated nightly (installed if needed).
fn nightly() -> Result<String> {
    if let Ok(forced) = std::env::var("VIPBUILD_EBPF_TOOLCHAIN") {
        if !forced.is_empty() {
            println!("setup: eBPF toolchain {forced} (from VIPBUILD_EBPF_TOOLCHAIN)");
            return Ok(forced);
        }
    }
    match llvm_major_of("nightly") {
        Some(major) if major == LLVM_MAJOR => {
            println!("setup: nightly present (LLVM {major})");
            return Ok("nightly".into());
        }
        Some(major) => {
            println!("setup: nightly is LLVM {major}, need {LLVM_MAJOR}: using {FALLBACK_NIGHTLY}")
        }
        None => println!("setup: no nightly toolchain: using {FALLBACK_NIGHTLY}"),
    }
    if llvm_major_of(FALLBACK_NIGHTLY).as_deref() != Some(LLVM_MAJOR) {
        println!("setup: installing {FALLBACK_NIGHTLY}");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            FALLBACK_NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    Ok(FALLBACK_NIGHTLY.into())
}

fn rust_src(toolchain: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", toolchain]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src present for {toolchain}");
        return Ok(());
    }
    println!("setup: adding rust-src to {toolchain}");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]))
}

fn bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    let linked = output(Command::new("sh").args(["-c", "ldd \"$(command -v bpf-linker)\""])).unwrap_or_default();
    let want_lib = format!("libLLVM.so.{LLVM_MAJOR}");
    if version.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") && linked.contains(&want_lib) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present (LLVM {LLVM_MAJOR})");
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (a few minutes)");
    let llvm = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    let path = format!("{llvm}/bin:{}", std::env::var("PATH").unwrap_or_default());
    status(
        Command::new("cargo")
            .env("LLVM_PREFIX", &llvm)
            .env("PATH", path)
            .args(["install", "bpf-linker", "--locked", "--force", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{LLVM_MAJOR}")),
    )
}

pub fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|e| format!("reading /proc/mounts: {e}"))?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next(), f.next(), f.next());
        dir == Some(BPFFS) && ty == Some("bpf")
    }) {
        println!("setup: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    fs::create_dir_all(BPFFS).map_err(|e| format!("creating {BPFFS}: {e}"))?;
    status(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// `kubernetes-validate` in a project-local virtualenv (`target/tools/venv`), so nothing
/// is installed into the system Python.
fn validator() -> Result<()> {
    let venv = crate::root().join("target/tools/venv");
    let bin = venv.join("bin").join(KUBERNETES_VALIDATE);
    let found = output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if found.trim() == KUBERNETES_VALIDATE_VERSION {
        println!("setup: {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} present ({})", bin.display());
        return Ok(());
    }
    if !venv.join("bin/pip").exists() {
        println!("setup: creating the virtualenv {}", venv.display());
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    println!("setup: installing {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} into {}", venv.display());
    status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}")),
    )
}
