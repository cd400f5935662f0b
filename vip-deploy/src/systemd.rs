//! The agent as a systemd service, for hosts that run the control plane without the
//! kubelet managing vip (bare metal, a kubeadm node where the operator prefers a unit to
//! a static pod). The same environment as the kubeadm static pod ([`static_pod`]): the
//! host's kubeconfig, the local apiserver, `--bootstrap` in elected ARP mode; the same
//! four capabilities, here as the unit's bounding set; the same stop budget.
//!
//! systemd unit files have no maintained Rust writer; the format needed here is a few
//! `Key=value` lines, whose one trap (values with spaces, quotes, backslashes or `%`
//! specifiers) [`quoted`] handles as systemd.syntax(7) and systemd.unit(5) say.

use std::fmt::Write as _;

use crate::{
    settings::Settings,
    workload::{capabilities, static_pod, TERMINATION_GRACE_SECONDS},
};

/// The unit file for `s`, ending in a newline.
pub fn unit(s: &Settings) -> String {
    let pod = static_pod(s);
    // Variables with a value only: the node name the pod reads from the API (a fieldRef)
    // is the hostname here, the agent's default.
    let env: Vec<(String, String)> = pod
        .spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|c| c.env.iter().flatten())
        .filter(|e| e.name.starts_with("VIP_"))
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    let caps: Vec<String> = capabilities(s).iter().map(|c| format!("CAP_{c}")).collect();
    let mut out = String::new();
    let mut line = |l: &str| {
        out.push_str(l);
        out.push('\n');
    };
    line("[Unit]");
    line("Description=vip: the control plane's virtual IP and load balancer");
    line("Wants=network-online.target");
    line("After=network-online.target");
    // Restarted as long as it takes: before `kubeadm init` or `join` writes the
    // kubeconfig the agent cannot start, and systemd's default (5 starts in 10 s) would
    // give up for good.
    line("StartLimitIntervalSec=0");
    line("");
    line("[Service]");
    line("Type=exec");
    line(&format!("ExecStart={} run", quoted(&s.binary)));
    for (name, value) in &env {
        line(&format!("Environment={}", quoted(&format!("{name}={value}"))));
    }
    // SIGTERM hands the VIP over (or, with --keep-forwarding-on-exit, leaves the data
    // plane for the next start); the budget is the pods' grace period.
    line("KillSignal=SIGTERM");
    line(&format!("TimeoutStopSec={TERMINATION_GRACE_SECONDS}s"));
    line("Restart=always");
    // Within the renew deadline (600 ms by default): a crashed leader restarted in time
    // adopts its own lead from the pins, where 1 s always cost a failover (an upgrade
    // trial). A crash loop at this pace costs little: the agent fails in milliseconds.
    line("RestartSec=200ms");
    // Root inside these four capabilities only, as the pods run.
    line(&format!("CapabilityBoundingSet={}", caps.join(" ")));
    line("NoNewPrivileges=yes");
    line("ProtectSystem=strict");
    line("ReadWritePaths=/sys/fs/bpf");
    line("ProtectHome=yes");
    line("PrivateTmp=yes");
    line("ProtectKernelModules=yes");
    line("RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET");
    line("");
    line("[Install]");
    line("WantedBy=multi-user.target");
    out
}

/// `value` as one word of a unit file: double-quoted when it has a space, a quote or a
/// backslash (escaped inside), and with `%` doubled so that systemd does not expand it
/// as a specifier.
fn quoted(value: &str) -> String {
    let value = value.replace('%', "%%");
    if !value.contains([' ', '\t', '"', '\'', '\\']) {
        return value;
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        let _ = write!(out, "{c}");
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::quoted;

    #[test]
    fn values_are_quoted_and_escaped_as_systemd_reads_them() {
        assert_eq!(quoted("VIP_VIP=192.0.2.10"), "VIP_VIP=192.0.2.10");
        assert_eq!(quoted("/opt/vip agent/vip-agent"), "\"/opt/vip agent/vip-agent\"");
        assert_eq!(quoted("A=b\"c\\d"), "\"A=b\\\"c\\\\d\"");
        assert_eq!(quoted("A=50%"), "A=50%%");
    }
}
