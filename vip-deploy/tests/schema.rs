//! Every rendered Kubernetes object passes strict schema validation for Kubernetes 1.33
//! (the API level it is built with) and 1.37 (the newest the pinned validator bundles),
//! offline: `kubernetes-validate --strict` (PyPI, which bundles the schemas), installed
//! by `cargo xtask setup` into `target/tools/venv`. Strict means an unknown field fails,
//! not just a wrong type.

mod common;

use std::{path::PathBuf, process::Command};

use common::{all_lines, render, root};

/// The Kubernetes version the objects are validated for: the API level of the
/// k8s-openapi feature (`v1_33`) they are built with.
const KUBERNETES_VERSION: &str = "1.33.0";
/// The newest release the pinned validator knows: what a cluster installed today runs,
/// where a field removed since 1.33 would fail.
const NEWEST_KUBERNETES_VERSION: &str = "1.37.0";

fn validator() -> PathBuf {
    let path = root().join("target/tools/venv/bin/kubernetes-validate");
    assert!(path.exists(), "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate)", path.display());
    path
}

#[test]
fn every_rendered_object_passes_strict_validation_for_1_33_and_1_37() {
    for version in [KUBERNETES_VERSION, NEWEST_KUBERNETES_VERSION] {
        validate_every_object(version);
    }
}

fn validate_every_object(version: &str) {
    let validator = validator();
    let dir = std::env::temp_dir().join(format!("vip-deploy-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (i, line) in all_lines().iter().enumerate() {
        // Helm values are not a Kubernetes object.
        if line[0] == "cilium-values" {
            continue;
        }
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let file = dir.join(format!("{i:02}-{}.yaml", line[0]));
        std::fs::write(&file, render(&line)).unwrap();
        files.push(file);
    }
    let out = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", version])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", validator.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "kubernetes-validate {version} failed ({}):\n{stdout}\n{stderr}", out.status);
    // It says "INFO <file> passed" per document; make sure it looked at every one.
    let documents: usize = all_lines()
        .iter()
        .filter(|l| l[0] != "cilium-values")
        .map(|l| {
            let line: Vec<&str> = l.iter().map(String::as_str).collect();
            common::documents(&render(&line)).len()
        })
        .sum();
    let passed = stdout.lines().filter(|l| l.contains("passed")).count();
    assert_eq!(passed, documents, "not every document was validated:\n{stdout}\n{stderr}");
}

#[test]
fn the_validator_rejects_an_unknown_field() {
    // Proves --strict is in force: the test above could otherwise pass on anything.
    let dir = std::env::temp_dir().join(format!("vip-deploy-strict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    let yaml = render(&["daemonset", "--vip=192.0.2.100", "--interface=eth0"])
        .replace("hostNetwork: true", "hostNetwork: true\n      hostNetwrok: true");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a misspelt field passed:\n{text}");
    assert!(text.contains("hostNetwrok"), "{text}");
}
