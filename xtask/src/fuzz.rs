//! `cargo xtask fuzz [SECONDS]`: a bounded run of the BGP decoder's fuzz target
//! (`vip-bgp/fuzz`, target `decode`), 60 s unless told. A BGP peer is untrusted input, so
//! the decoder must never panic nor return a message that does not re-encode to itself;
//! libFuzzer stops at the first input that breaks either and leaves it in
//! `vip-bgp/fuzz/artifacts/decode/`. Not part of `cargo xtask test`: a fuzz run is open
//! ended, a test is not. The corpus (`vip-bgp/fuzz/corpus/decode/`) grows across runs.
//!
//! cargo-fuzz needs a nightly compiler (for `-Zsanitizer`); the eBPF toolchain `setup`
//! chose is one, so it is reused rather than installing another.

use std::process::Command;

use crate::{root, status, Result};

/// cargo-fuzz release, pinned.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long a run lasts by default, in seconds.
const DEFAULT_SECONDS: u64 = 60;
/// libFuzzer's longest input: the 4096-octet maximum message and the start of the next.
const MAX_LEN: u32 = 4200;

pub fn fuzz(toolchain: &str, args: &[String]) -> Result<()> {
    let seconds = match args.first() {
        None => DEFAULT_SECONDS,
        Some(s) => s.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
            format!("cargo xtask fuzz {s:?}: expected a run time in whole seconds (e.g. cargo xtask fuzz 300)")
        })?,
    };
    cargo_fuzz()?;
    let dir = root().join("vip-bgp/fuzz");
    std::fs::create_dir_all(dir.join("corpus/decode")).map_err(|e| format!("creating the corpus directory: {e}"))?;
    println!("xtask: fuzzing the BGP decoder for {seconds} s ({toolchain})");
    status(
        Command::new("cargo")
            .current_dir(&dir)
            .arg(format!("+{toolchain}"))
            .args(["fuzz", "run", "decode", "--", "-dict=decode.dict"])
            .arg(format!("-max_len={MAX_LEN}"))
            .arg(format!("-max_total_time={seconds}")),
    )?;
    println!("xtask: no crash in {seconds} s; corpus in {}", dir.join("corpus/decode").display());
    Ok(())
}

/// Installs the pinned cargo-fuzz unless present.
fn cargo_fuzz() -> Result<()> {
    let found = Command::new("cargo").args(["fuzz", "--version"]).output().ok();
    let found = found.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    if found == format!("cargo-fuzz {CARGO_FUZZ_VERSION}") {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
}
