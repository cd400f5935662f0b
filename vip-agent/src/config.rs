//! Command-line contract (see `shared/design.md`) and its validation.
//!
//! Every flag also reads an environment variable, `VIP_` + the flag in upper snake case,
//! so manifests can configure the agent without building argument lists.

use std::{collections::BTreeSet, net::Ipv4Addr};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{dataplane::AttachMode, netdev};

#[derive(Debug, Parser)]
#[command(name = "vip-agent", version, about = "Highly-available VIP for the Kubernetes control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the data plane on an interface and serve the VIP until SIGINT/SIGTERM.
    Run(RunArgs),
}

/// How this node decides whether it leads the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Election {
    /// No election: this node is the permanent leader (single node, bare metal, tests).
    None,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface that faces the clients (the one ARP for the VIP arrives on).
    #[arg(long, env = "VIP_INTERFACE", value_name = "IF")]
    pub interface: String,
    /// Virtual IP to serve. Repeat the flag (or separate with commas) for several.
    #[arg(long = "vip", env = "VIP_VIP", value_name = "IP", required = true, value_delimiter = ',')]
    pub vips: Vec<Ipv4Addr>,
    /// Leader election. Only `none` is available yet: this node always leads.
    #[arg(long, env = "VIP_ELECTION", value_enum)]
    pub election: Election,
    /// XDP attach mode.
    #[arg(long, env = "VIP_XDP_MODE", value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
}

/// A validated `run` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub interface: String,
    pub vips: Vec<Ipv4Addr>,
    pub election: Election,
    pub xdp_mode: AttachMode,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--vip {vip}: {why}")]
    BadVip { vip: Ipv4Addr, why: &'static str },
    #[error("--vip {vip} is given twice")]
    DuplicateVip { vip: Ipv4Addr },
    #[error("{count} VIPs given, at most {max} are supported")]
    TooManyVips { count: usize, max: u32 },
    #[error("--interface: {0}")]
    Interface(#[from] netdev::NetdevError),
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = ConfigError;

    fn try_from(args: RunArgs) -> Result<Self, ConfigError> {
        netdev::validate_name(&args.interface)?;
        if args.vips.len() > vip_common::MAX_VIPS as usize {
            return Err(ConfigError::TooManyVips { count: args.vips.len(), max: vip_common::MAX_VIPS });
        }
        let mut seen = BTreeSet::new();
        for &vip in &args.vips {
            check_vip(vip)?;
            if !seen.insert(vip) {
                return Err(ConfigError::DuplicateVip { vip });
            }
        }
        Ok(RunConfig { interface: args.interface, vips: args.vips, election: args.election, xdp_mode: args.xdp_mode })
    }
}

/// A VIP must be a unicast address a client can ARP for.
fn check_vip(vip: Ipv4Addr) -> Result<(), ConfigError> {
    let why = if vip.is_unspecified() {
        "the unspecified address cannot be a VIP"
    } else if vip.is_loopback() {
        "a loopback address cannot be a VIP"
    } else if vip.is_multicast() {
        "a multicast address cannot be a VIP"
    } else if vip.is_broadcast() {
        "the broadcast address cannot be a VIP"
    } else {
        return Ok(());
    };
    Err(ConfigError::BadVip { vip, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["vip-agent", "run"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command;
        RunConfig::try_from(run).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_repeated_and_comma_separated_vips() {
        let cfg =
            parse(&["--interface", "eth0", "--vip", "10.0.0.1,10.0.0.2", "--vip", "10.0.0.3", "--election", "none"])
                .unwrap();
        assert_eq!(cfg.vips, ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|s| s.parse::<Ipv4Addr>().unwrap()));
        assert_eq!(cfg.xdp_mode, AttachMode::Auto);
    }

    #[test]
    fn a_bad_vip_is_named_in_the_error() {
        let err = parse(&["--interface", "eth0", "--vip", "10.0.0.300", "--election", "none"]).unwrap_err();
        assert!(err.contains("10.0.0.300"), "{err}");
        let err = parse(&["--interface", "eth0", "--vip", "224.0.0.1", "--election", "none"]).unwrap_err();
        assert_eq!(err, "--vip 224.0.0.1: a multicast address cannot be a VIP");
        let err = parse(&["--interface", "eth0", "--vip", "10.0.0.1,10.0.0.1", "--election", "none"]).unwrap_err();
        assert_eq!(err, "--vip 10.0.0.1 is given twice");
    }

    #[test]
    fn a_bad_interface_name_is_named_in_the_error() {
        let err = parse(&["--interface", "eth/0", "--vip", "10.0.0.1", "--election", "none"]).unwrap_err();
        assert!(err.contains("\"eth/0\""), "{err}");
    }

    #[test]
    fn unknown_xdp_mode_is_rejected() {
        let err =
            parse(&["--interface", "eth0", "--vip", "10.0.0.1", "--election", "none", "--xdp-mode", "hw"]).unwrap_err();
        assert!(err.contains("'hw'"), "{err}");
    }
}
