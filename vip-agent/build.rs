//! Builds the XDP object (crate `vip-ebpf`) for bpfel-unknown-none with nightly and
//! `-Z build-std=core`, and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! `VIPBUILD_EBPF_TOOLCHAIN` names the rustup toolchain to build it with (default `nightly`);
//! `cargo xtask setup` picks one whose LLVM matches bpf-linker's and exports it.

use std::path::Path;

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-env-changed=VIPBUILD_EBPF_TOOLCHAIN");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).parent().ok_or_else(|| aya_build_error("no parent"))?;
    let ebpf_dir = root.join("vip-ebpf");
    // aya-build tracks vip-ebpf's own directory; the shared types live next door.
    println!("cargo:rerun-if-changed={}", root.join("vip-common/src").display());
    let toolchain_name = std::env::var("VIPBUILD_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain_name.as_deref() {
        Some(name) if !name.is_empty() => Toolchain::Custom(name),
        _ => Toolchain::Nightly,
    };
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| aya_build_error("non-UTF-8 path"))?;
    aya_build::build_ebpf([Package { name: "vip-ebpf", root_dir: ebpf_dir, ..Default::default() }], toolchain)
}

fn aya_build_error(what: &str) -> std::io::Error {
    std::io::Error::other(format!("vip-agent build script: {what}"))
}
