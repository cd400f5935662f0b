//! vip-agent: the control plane of vip.
//!
//! One module per concern: [`config`] turns flags into a validated configuration,
//! [`netdev`] resolves interfaces, [`dataplane`] loads and attaches the XDP program and
//! (in [`dataplane::maps`], the only place that touches `aya::maps`) reads and writes its
//! maps, [`announce`] makes the VIP known (ARP and Neighbor Discovery, with [`election`]), and [`agent`] ties
//! them into the daemon.

pub mod agent;
pub mod announce;
pub mod announcement;
pub mod apiclient;
pub mod arp;
pub mod balancer;
pub mod caps;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod discovery;
pub mod election;
pub mod health;
pub mod kubeconfig;
pub mod live;
pub mod maglev;
pub mod metrics;
pub mod ndp;
pub mod netdev;
pub mod netlink;
pub mod rawsock;
pub mod status;
pub mod vipprobe;
