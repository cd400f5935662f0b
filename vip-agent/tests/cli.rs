//! The binary's edge: a bad value is refused on one line that names it, and says where it
//! came from when that is not the command line (a unit's `Environment=`, a config file).
//! Configuration is checked before anything touches the host, so these run unprivileged.

use std::process::Command;

/// `vip-agent run` with `args` and `env`, expected to be refused: its one line of stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vip-agent"))
        .arg("run")
        .args(["--interface", "eth0", "--vip", "10.0.0.1", "--election", "none"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("vip-agent runs");
    assert!(!out.status.success(), "{args:?} {env:?} was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr.trim().to_owned()
}

#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let line = refused(&[], &[("VIP_DRAIN_HOLD", "2h")]);
    assert_eq!(line, "vip-agent: error: --drain-hold 2h: must be 0s to 1h (from VIP_DRAIN_HOLD)");
    // One clap cannot parse, too.
    let line = refused(&[], &[("VIP_HEALTH_INTERVAL", "2x")]);
    assert!(
        line.contains("invalid value '2x' for '--health-interval") && line.contains("(from VIP_HEALTH_INTERVAL)"),
        "{line}"
    );
}

#[test]
fn a_bad_value_on_the_command_line_needs_no_origin() {
    let line = refused(&["--drain-hold", "2h"], &[]);
    assert_eq!(line, "vip-agent: error: --drain-hold 2h: must be 0s to 1h");
}

#[test]
fn a_bad_value_from_the_config_file_names_the_file() {
    let dir = std::env::temp_dir().join(format!("vip-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vip.yaml");
    std::fs::write(&file, "drain_hold: 2h\nrise: 3\n").unwrap();
    let f = file.to_str().unwrap();
    let line = refused(&["--config", f], &[]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(line, format!("vip-agent: error: --drain-hold 2h: must be 0s to 1h (from --config {f})"));
}

/// A value that starts with '-' is a bad value of its flag, named as such (clap took it
/// for an unknown argument, naming no flag), with the flag's own range, not its type's
/// (`--vlan -1` was "not in 0..=65535", a new-user trial).
#[test]
fn a_negative_value_is_named_with_its_flag() {
    let line = refused(&["--rise", "-1"], &[]);
    assert_eq!(line, "vip-agent: error: --rise -1: must be 1 to 100");
    let line = refused(&["--vlan", "-1"], &[]);
    assert_eq!(line, "vip-agent: error: --vlan -1: must be 1 to 4094 (0 and 4095 are reserved)");
    for (flag, range) in [("--port", "1 to 65535"), ("--maglev-size", "a prime from 3 to 65537")] {
        let line = refused(&[flag, "-5"], &[]);
        assert_eq!(line, format!("vip-agent: error: {flag} -5: must be {range}"));
    }
    let line = refused(&["--vlan", "70000"], &[("VIP_VLAN", "1")]);
    assert_eq!(line, "vip-agent: error: --vlan 70000: must be 1 to 4094 (0 and 4095 are reserved)");
    let line = refused(&["--drain-hold", "-1s"], &[]);
    assert!(line.contains("invalid value '-1s' for '--drain-hold"), "{line}");
    let line = refused(&["--lease-namespace", "-x"], &[]);
    assert!(line.contains("--lease-namespace \"-x\""), "{line}");
}

/// Two flags that contradict each other are refused, not one of them silently ignored.
#[test]
fn an_insecure_check_with_a_ca_is_refused() {
    let line = refused(&["--health-insecure", "--health-ca", "/etc/ca.pem"], &[]);
    assert!(line.contains("--health-insecure cannot be used with --health-ca"), "{line}");
    let line = refused(&["--health-ca", "/etc/ca.pem"], &[("VIP_HEALTH_INSECURE", "true")]);
    assert!(
        line.contains("--health-insecure cannot be used with --health-ca")
            && line.contains("(from VIP_HEALTH_INSECURE)"),
        "{line}"
    );
}

/// A variable set to false is not set: `VIP_HEALTH_INSECURE=false` beside a CA is the
/// CA's check (templated units write every variable). The run then fails on the
/// interface, past the flags.
#[test]
fn a_flag_variable_set_to_false_does_not_conflict() {
    let out = Command::new(env!("CARGO_BIN_EXE_vip-agent"))
        .args([
            "run",
            "--interface",
            "nosuch0",
            "--vip",
            "10.0.0.1",
            "--election",
            "none",
            "--health-ca",
            "/etc/ca.pem",
        ])
        .env("VIP_HEALTH_INSECURE", "false")
        .output()
        .expect("vip-agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("cannot be used with"), "{stderr}");
}

/// A link-local VIP (169.254.0.0/16) is refused, as fe80::/10 is.
#[test]
fn a_link_local_vip_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_vip-agent"))
        .args(["run", "--interface", "eth0", "--vip", "169.254.1.1", "--election", "none"])
        .output()
        .expect("vip-agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--vip 169.254.1.1: a link-local address"), "{stderr}");
}

/// With `--log-format json` the reason a run stopped is a JSON line too: a log shipper
/// parses every line. (Errors in the flags themselves come before the format is known,
/// and stay plain.)
#[test]
fn a_run_error_is_one_json_line_in_json_format() {
    let out = Command::new(env!("CARGO_BIN_EXE_vip-agent"))
        .args(["run", "--interface", "nosuch0", "--vip", "10.0.0.1", "--election", "none", "--log-format", "json"])
        .output()
        .expect("vip-agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim().lines().last().unwrap_or_default();
    let line: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(line["level"], "ERROR", "{stderr}");
    assert!(line["fields"]["error"].as_str().is_some_and(|e| e.contains("nosuch0")), "{stderr}");
    assert!(!stderr.contains("vip-agent: error:"), "a plain line besides: {stderr}");
}

/// A flag that takes several values separated by commas names the value as given when an
/// entry is bad: `fd00::101,` was refused as the invalid value `''` (a new-user trial).
#[test]
fn a_bad_entry_of_a_comma_separated_value_names_the_whole_value() {
    let line = refused(&["--vip", "fd00::101,"], &[]);
    assert_eq!(
        line,
        "vip-agent: error: invalid value 'fd00::101,' for '--vip <IP>': an empty entry (a comma with nothing before or after it) (see --help)"
    );
    let line = refused(&["--vip", "10.0.0.2,10.0.0.300"], &[]);
    assert!(line.contains("invalid value '10.0.0.2,10.0.0.300' for '--vip <IP>': 10.0.0.300: "), "{line}");
    let line = refused(&[], &[("VIP_BACKEND", "10.0.0.11,,10.0.0.12")]);
    assert!(
        line.contains("invalid value '10.0.0.11,,10.0.0.12' for '--backend") && line.contains("(from VIP_BACKEND)"),
        "{line}"
    );
}
