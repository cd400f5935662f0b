//! The Linux capabilities `vip-agent run` needs, checked before anything is touched.
//!
//! Without this check a missing capability shows up late and obscurely: without
//! CAP_PERFMON the verifier rejects the program's packet-pointer arithmetic ("pointer -=
//! pointer prohibited"), without CAP_NET_RAW the claim probe and gratuitous ARP cannot
//! open their raw socket. A container whose `securityContext` drops one should be told
//! which, by name, at once.
//!
//! Source: capabilities(7); `include/uapi/linux/capability.h` for the bit numbers. On
//! kernels before 5.8 (no CAP_BPF, CAP_PERFMON) CAP_SYS_ADMIN stands in for both, as the
//! kernel's own `bpf_capable()` and `perfmon_capable()` accept it.

/// A capability the agent may need, with its bit in the `CapEff` mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Attach XDP, add the VIP to `lo`, set interface sysctls over netlink.
    NetAdmin,
    /// Raw packet sockets: the RFC 5227 claim probe and gratuitous ARP (ARP mode), and
    /// the VIP-path probe of DSR backends (any mode).
    NetRaw,
    /// Load the XDP program and create its maps.
    Bpf,
    /// Let the verifier accept pointer arithmetic and bounded loops in the program.
    Perfmon,
}

impl Capability {
    const SYS_ADMIN_BIT: u32 = 21;

    fn bit(self) -> u32 {
        match self {
            Capability::NetAdmin => 12,
            Capability::NetRaw => 13,
            Capability::Perfmon => 38,
            Capability::Bpf => 39,
        }
    }

    /// The name in `securityContext.capabilities.add` (without `CAP_`).
    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "NET_ADMIN",
            Capability::NetRaw => "NET_RAW",
            Capability::Bpf => "BPF",
            Capability::Perfmon => "PERFMON",
        }
    }

    /// Whether CAP_SYS_ADMIN grants this one too (the kernel's `bpf_capable()`,
    /// `perfmon_capable()`).
    fn sys_admin_covers(self) -> bool {
        matches!(self, Capability::Bpf | Capability::Perfmon)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapsError {
    #[error(
        "missing capabilit{plural} {names}: add {names} to the container's securityContext.capabilities.add \
         (vip-agent run needs {needed})",
        plural = if missing.len() == 1 { "y" } else { "ies" },
        names = missing.iter().map(|c| format!("CAP_{}", c.name())).collect::<Vec<_>>().join(", "),
        needed = needed.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
    )]
    Missing { missing: Vec<Capability>, needed: Vec<Capability> },
    #[error("/proc/self/status: no CapEff line to check capabilities against")]
    Unreadable,
}

/// What `run` needs: everything, except CAP_NET_RAW when it opens no raw socket (BGP
/// mode forwarding locally: no ARP, no VIP-path probe, which DSR and IPIP both send).
pub fn needed(raw_sockets: bool) -> Vec<Capability> {
    let mut caps = vec![Capability::NetAdmin, Capability::Bpf, Capability::Perfmon];
    if raw_sockets {
        caps.insert(1, Capability::NetRaw);
    }
    caps
}

/// The capabilities in `needed` that the effective mask `cap_eff` lacks.
pub fn missing(cap_eff: u64, needed: &[Capability]) -> Vec<Capability> {
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    needed
        .iter()
        .copied()
        .filter(|c| {
            let granted = has(c.bit()) || (c.sys_admin_covers() && has(Capability::SYS_ADMIN_BIT));
            !granted
        })
        .collect()
}

/// The `CapEff:` mask from a `/proc/<pid>/status` text (hexadecimal).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Checks this process's effective capabilities against [`needed`].
pub fn check(raw_sockets: bool) -> Result<(), CapsError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|_| CapsError::Unreadable)?;
    let eff = parse_cap_eff(&status).ok_or(CapsError::Unreadable)?;
    let needed = needed(raw_sockets);
    let missing = missing(eff, &needed);
    match missing.is_empty() {
        true => Ok(()),
        false => Err(CapsError::Missing { missing, needed }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(bits: &[u32]) -> u64 {
        bits.iter().fold(0, |m, b| m | 1 << b)
    }

    #[test]
    fn the_manifest_set_is_enough_in_both_modes() {
        let eff = mask(&[12, 13, 38, 39]);
        assert!(missing(eff, &needed(true)).is_empty());
        assert!(missing(eff, &needed(false)).is_empty());
    }

    #[test]
    fn each_missing_capability_is_named() {
        let err = CapsError::Missing { missing: missing(mask(&[12, 39]), &needed(true)), needed: needed(true) };
        assert_eq!(
            err.to_string(),
            "missing capabilities CAP_NET_RAW, CAP_PERFMON: add CAP_NET_RAW, CAP_PERFMON to the container's \
             securityContext.capabilities.add (vip-agent run needs NET_ADMIN, NET_RAW, BPF, PERFMON)"
        );
    }

    #[test]
    fn without_raw_sockets_net_raw_is_not_needed() {
        assert!(missing(mask(&[12, 38, 39]), &needed(false)).is_empty());
        assert_eq!(missing(mask(&[12, 38, 39]), &needed(true)), vec![Capability::NetRaw]);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_on_older_kernels() {
        assert!(missing(mask(&[12, 13, 21]), &needed(true)).is_empty());
        assert_eq!(missing(mask(&[13, 21]), &needed(true)), vec![Capability::NetAdmin]);
    }

    #[test]
    fn cap_eff_is_read_from_proc_status() {
        let status = "Name:\tvip-agent\nCapInh:\t0000000000000000\nCapEff:\t000000c000003000\n";
        assert_eq!(parse_cap_eff(status), Some(mask(&[12, 13, 38, 39])));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
