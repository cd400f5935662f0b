//! `deploy/` holds the generator's output for the example flags in `deploy/README.md`,
//! byte for byte, so the files users copy never drift from what `vip-agent manifest`
//! prints. After a change to the generator, regenerate them with
//! `VIP_DEPLOY_BLESS=1 cargo test -p vip-deploy --test deploy_files` and review the diff.

mod common;

use common::{render, root};

/// Set to regenerate the files instead of comparing.
const BLESS: &str = "VIP_DEPLOY_BLESS";
const REGENERATE: &str = "VIP_DEPLOY_BLESS=1 cargo test -p vip-deploy --test deploy_files";

/// Each file under `deploy/` and the `vip-agent manifest` arguments it is rendered with.
const FILES: &[(&str, &[&str])] = &[
    ("daemonset.yaml", &["daemonset", "--vip", "192.0.2.100", "--interface", "eth0"]),
    ("kubeadm/vip-agent.yaml", &["pod", "--vip", "192.0.2.100", "--interface", "eth0"]),
    ("k3s/vip.yaml", &["k3s", "--vip", "192.0.2.100", "--interface", "eth0"]),
    ("cilium-values.yaml", &["cilium-values", "--vip", "192.0.2.100"]),
    ("systemd/vip-agent.service", &["systemd", "--vip", "192.0.2.100", "--interface", "eth0"]),
];

/// The file's content: a line saying how it was made, then the generator's output.
fn expected(args: &[&str]) -> String {
    format!("# Rendered by `vip-agent manifest {}`; regenerate with `{REGENERATE}`.\n{}", args.join(" "), render(args))
}

#[test]
fn deploy_files_equal_the_generator_output() {
    let bless = std::env::var_os(BLESS).is_some();
    let mut stale = Vec::new();
    for (file, args) in FILES {
        let path = root().join("deploy").join(file);
        let want = expected(args);
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {}
            Ok(_) => stale.push(format!("deploy/{file} differs from `vip-agent manifest {}`", args.join(" "))),
            Err(e) => stale.push(format!("deploy/{file}: {e}")),
        }
    }
    assert!(stale.is_empty(), "{}\nregenerate with: {REGENERATE}", stale.join("\n"));
}

#[test]
fn deploy_readme_lists_the_command_of_every_file() {
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).expect("deploy/README.md");
    for (file, args) in FILES {
        let command = format!("vip-agent manifest {}", args.join(" "));
        assert!(readme.contains(&command), "deploy/README.md does not show `{command}` (for deploy/{file})");
        assert!(readme.contains(file), "deploy/README.md does not name deploy/{file}");
    }
}
