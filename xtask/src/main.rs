//! `cargo xtask`: the project's own build, setup and test driver.
//!
//! ```text
//! cargo xtask setup          install what a fresh machine lacks (idempotent)
//! cargo xtask build          build the XDP object and the agent (release)
//! cargo xtask run -- ARGS    build and run vip-agent ARGS on this machine
//! cargo xtask test           setup, then the image, then every test
//! cargo xtask image          a static vip-agent in a reproducible OCI archive
//! cargo xtask fuzz [SECONDS] a bounded fuzz run of the BGP decoder (60 s by default)
//! cargo xtask bench [-- SECTION...]  setup, then the benchmarks (xdp maglev agent failover bgp scale discovery peers katran)
//! cargo xtask demo           setup, then the lab demo
//! ```
//!
//! Plain std, no dependencies: it has to compile quickly on a machine that has nothing
//! else yet.

mod fuzz;
mod image;
mod katran;
mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run().map(|_| ()),
        Some("build") => setup::build_toolchain().and_then(|tc| build(&tc)),
        // The agent needs bpffs mounted for its pins, nothing the labs use.
        Some("run") => setup::build_toolchain()
            .and_then(|tc| setup::bpffs().map(|()| tc))
            .and_then(|tc| run_agent(&tc, rest_after_dashes(&args[1..]))),
        Some("test") => setup::run().and_then(|tc| test(&tc, &args[1..])),
        Some("bench") => setup::run().and_then(|tc| bench(&tc, &args[1..])),
        Some("demo") => setup::run().and_then(|tc| demo(&tc)),
        Some("image") => setup::build_toolchain().and_then(|tc| image::image(&tc)).map(|_| ()),
        Some("fuzz") => setup::run().and_then(|tc| fuzz::fuzz(&tc, &args[1..])),
        _ => {
            eprintln!("usage: cargo xtask setup | build | run -- ARGS | test [FILTER] | bench | demo | image | fuzz [SECONDS]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            ExitCode::FAILURE
        }
    }
}

pub type Result<T> = std::result::Result<T, String>;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn rest_after_dashes(args: &[String]) -> &[String] {
    match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    }
}

/// A cargo invocation at the workspace root with the eBPF toolchain exported for the
/// agent's build script.
fn cargo(toolchain: &str) -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).env("VIPBUILD_EBPF_TOOLCHAIN", toolchain);
    cmd
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().map_err(|e| format!("running {shown}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed: {st}"))
    }
}

fn build(toolchain: &str) -> Result<()> {
    println!("xtask: building vip-agent (release) with the XDP object embedded");
    status(cargo(toolchain).args(["build", "--release", "-p", "vip-agent"]))?;
    println!("xtask: built {}", root().join("target/release/vip-agent").display());
    Ok(())
}

fn run_agent(toolchain: &str, args: &[String]) -> Result<()> {
    build(toolchain)?;
    status(Command::new(root().join("target/release/vip-agent")).args(args))
}

/// Every test: unit tests, kernel fixture tests (BPF_PROG_RUN) and the network-namespace
/// tests. The end-to-end tests drive the agent binary, so it is built first and its path
/// handed to them; vip-deploy's image tests inspect the OCI archive, so it is built too.
fn test(toolchain: &str, filter: &[String]) -> Result<()> {
    status(cargo(toolchain).args(["build", "-p", "vip-agent"]))?;
    let archive = image::image(toolchain)?;
    let agent = root().join("target/debug/vip-agent");
    let mut cmd = cargo(toolchain);
    cmd.env("VIPLAB_AGENT_BIN", &agent)
        .env("VIPLAB_IMAGE_ARCHIVE", &archive)
        .args(["test", "--no-fail-fast"])
        .args(filter);
    let (passed, failed, ok) = run_counting_tests(&mut cmd)?;
    // One closing line over every test binary, so the total is what a reader sees last.
    println!("\nsummary: {passed} passed, {failed} failed");
    if ok && failed == 0 {
        Ok(())
    } else {
        Err("tests failed".into())
    }
}

/// Runs `cmd`, echoing its stdout, and adds up libtest's `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64, bool)> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().map_err(|e| format!("running {cmd:?}: {e}"))?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.map_err(|e| format!("reading test output: {e}"))?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count_before(rest, " passed");
                failed += count_before(rest, " failed");
            }
        }
    }
    let st = child.wait().map_err(|e| format!("waiting for cargo test: {e}"))?;
    Ok((passed, failed, st.success()))
}

/// In "ok. 4 passed; 0 failed; ...", the number right before `word`.
fn count_before(text: &str, word: &str) -> u64 {
    text.find(word)
        .and_then(|end| text[..end].rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The benchmark sections: `vip-bench` measures vip alone (`xdp`, `maglev`, `agent`,
/// `failover`, `bgp`, `scale`); `vip-peers` measures it beside its peers (`peers`: HAProxy,
/// nftables DNAT, direct; `failover`: keepalived). No section named: all of them.
const VIP_BENCH_SECTIONS: &[&str] = &["xdp", "maglev", "agent", "failover", "bgp", "scale", "discovery"];
const VIP_PEERS_SECTIONS: &[&str] = &["peers", "failover"];
/// `vip-katran`: vip beside Katran's balancer, per packet (Katran fetched and built first).
const KATRAN_SECTION: &str = "katran";

fn bench(toolchain: &str, args: &[String]) -> Result<()> {
    // Section names, then vip-peers' flags (`--rounds N`, ...), passed through.
    let args = rest_after_dashes(args);
    let first_flag = args.iter().position(|a| a.starts_with("--")).unwrap_or(args.len());
    let (sections, flags) = args.split_at(first_flag);
    if let Some(bad) = sections.iter().find(|s| {
        !VIP_BENCH_SECTIONS.contains(&s.as_str()) && !VIP_PEERS_SECTIONS.contains(&s.as_str()) && *s != KATRAN_SECTION
    }) {
        return Err(format!(
            "cargo xtask bench: unknown section {bad:?} (sections: xdp, maglev, agent, failover, bgp, scale, discovery, peers, katran)"
        ));
    }
    let wants = |list: &[&str]| sections.is_empty() || sections.iter().any(|s| list.contains(&s.as_str()));
    let pick = |list: &[&str]| -> Vec<String> {
        sections.iter().filter(|s| list.contains(&s.as_str())).map(|s| s.to_string()).collect()
    };
    status(cargo(toolchain).args(["build", "--release", "-p", "vip-agent", "-p", "tests", "--bins"]))?;
    let release = root().join("target/release");
    let with_bins = |cmd: &mut Command| {
        cmd.env("VIPLAB_AGENT_BIN", release.join("vip-agent"))
            .env("VIPLAB_STANDIN_BIN", release.join("vip-standin"))
            .env("VIPLAB_LEASEAPI_BIN", release.join("vip-leaseapi"))
            .env("VIPLAB_RESPONDER_BIN", release.join("vip-responder"));
    };
    if wants(VIP_BENCH_SECTIONS) {
        let mut cmd = Command::new(release.join("vip-bench"));
        with_bins(&mut cmd);
        status(cmd.args(pick(VIP_BENCH_SECTIONS)))?;
    }
    if wants(VIP_PEERS_SECTIONS) {
        setup::apt_install(setup::BENCH_PACKAGES)?;
        let mut cmd = Command::new(release.join("vip-peers"));
        with_bins(&mut cmd);
        status(cmd.args(pick(VIP_PEERS_SECTIONS)).args(flags))?;
    }
    if wants(&[KATRAN_SECTION]) {
        // Katran's source comes from the network: when every section runs, a machine that
        // cannot reach it skips this one (said) rather than failing the others' run.
        let object = match katran::build() {
            Ok(object) => object,
            Err(e) if sections.is_empty() => {
                println!("katran: skipped ({e}); set KATRAN_SRC to a clone of facebookincubator/katran");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // Both programs on one CPU, the last one, as the per-packet figures are taken.
        let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
        status(
            Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(release.join("vip-katran"))
                .arg(&object)
                .arg(katran::COMMIT),
        )?;
    }
    Ok(())
}

fn demo(toolchain: &str) -> Result<()> {
    status(cargo(toolchain).args(["build", "-p", "vip-agent", "-p", "tests", "--bins"]))?;
    let agent = root().join("target/debug/vip-agent");
    let standin = root().join("target/debug/vip-standin");
    status(
        Command::new(root().join("target/debug/vip-demo"))
            .env("VIPLAB_AGENT_BIN", &agent)
            .env("VIPLAB_STANDIN_BIN", &standin),
    )
}
