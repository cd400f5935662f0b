//! `vip-agent run`: bring the data plane up on one interface, serve until told to stop,
//! and take everything down again.
//!
//! Order matters for "nothing half-applied": the interface is resolved and the maps are
//! filled before the program is attached, so the program never runs on empty state, and
//! any failure before attach leaves the interface untouched (dropping the loaded object
//! frees it).

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, info_span, Instrument};
use vip_common::{Config, VipState};

use crate::{
    config::{Election, RunConfig},
    dataplane::{Dataplane, DataplaneError, MapError, Program},
    netdev::{self, NetdevError},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("installing the {signal} handler failed")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    let span = info_span!("run", interface = %cfg.interface);
    async move {
        let mut sigterm =
            signal(SignalKind::terminate()).map_err(|source| RunError::Signal { signal: "SIGTERM", source })?;
        let mut sigint =
            signal(SignalKind::interrupt()).map_err(|source| RunError::Signal { signal: "SIGINT", source })?;

        let dev = netdev::lookup(&cfg.interface)?;
        let mut dp = Dataplane::load()?;
        dp.maps_mut().set_config(&Config::new(dev.mac.0, dev.ipv4.map(|a| a.octets()).unwrap_or_default()))?;
        let state = match cfg.election {
            Election::None => VipState::leader_until(VipState::FOREVER),
        };
        for &vip in &cfg.vips {
            dp.maps_mut().set_vip(vip, state)?;
        }
        let mode = dp.attach(Program::Vip, &dev, cfg.xdp_mode)?;
        info!(mac = %dev.mac, %mode, vips = ?cfg.vips, "serving: leader for every VIP (--election none)");

        let signal = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        info!(signal, "stopping");
        // Stop answering first, then detach: between the two the kernel must not get to
        // answer ARP for a VIP we no longer serve.
        for &vip in &cfg.vips {
            dp.maps_mut().set_vip(vip, VipState::follower())?;
        }
        dp.detach()?;
        info!("stopped cleanly");
        Ok(())
    }
    .instrument(span)
    .await
}
