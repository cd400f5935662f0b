//! Typed access to the data plane's maps. This is the only module that touches
//! `aya::maps`: everything else speaks in `vip-common` types and std addresses.

use std::net::Ipv4Addr;

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    Ebpf,
};
use vip_common::{map_names, Config, Reason, VipKey, VipState};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("the eBPF object has no map named {name:?}")]
    Missing { name: &'static str },
    #[error("map {name:?} has an unexpected type or layout")]
    Type {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{op} on map {name:?} failed")]
    Op {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The data plane's maps, owned.
pub struct Maps {
    config: Array<MapData, Config>,
    vips: HashMap<MapData, VipKey, VipState>,
    stats: PerCpuArray<MapData, u64>,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, MapError> {
    ebpf.take_map(name).ok_or(MapError::Missing { name })
}

impl Maps {
    /// Takes ownership of the maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        let ty = |name| move |source| MapError::Type { name, source };
        Ok(Self {
            config: Array::try_from(take(ebpf, map_names::CONFIG)?)
                .map_err(ty(map_names::CONFIG))?,
            vips: HashMap::try_from(take(ebpf, map_names::VIPS)?).map_err(ty(map_names::VIPS))?,
            stats: PerCpuArray::try_from(take(ebpf, map_names::STATS)?)
                .map_err(ty(map_names::STATS))?,
        })
    }

    pub fn set_config(&mut self, config: &Config) -> Result<(), MapError> {
        self.config
            .set(0, config, 0)
            .map_err(|source| MapError::Op {
                name: map_names::CONFIG,
                op: "set",
                source,
            })
    }

    pub fn config(&self) -> Result<Config, MapError> {
        self.config.get(&0, 0).map_err(|source| MapError::Op {
            name: map_names::CONFIG,
            op: "get",
            source,
        })
    }

    /// Inserts or replaces the state of `vip`. The kernel swaps the element whole.
    pub fn set_vip(&mut self, vip: Ipv4Addr, state: VipState) -> Result<(), MapError> {
        self.vips
            .insert(VipKey::new(vip.octets()), state, 0)
            .map_err(|source| MapError::Op {
                name: map_names::VIPS,
                op: "insert",
                source,
            })
    }

    /// Removes `vip`; removing one that is not there is not an error.
    pub fn remove_vip(&mut self, vip: Ipv4Addr) -> Result<(), MapError> {
        match self.vips.remove(&VipKey::new(vip.octets())) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapError::Op {
                name: map_names::VIPS,
                op: "remove",
                source,
            }),
        }
    }

    /// Every VIP and its state, sorted by address.
    pub fn vips(&self) -> Result<Vec<(Ipv4Addr, VipState)>, MapError> {
        let mut out = Vec::new();
        for entry in self.vips.iter() {
            let (key, state) = entry.map_err(|source| MapError::Op {
                name: map_names::VIPS,
                op: "iterate",
                source,
            })?;
            out.push((Ipv4Addr::from(key.addr), state));
        }
        out.sort_by_key(|(addr, _)| *addr);
        Ok(out)
    }

    /// The counter of `reason`, summed over CPUs.
    pub fn counter(&self, reason: Reason) -> Result<u64, MapError> {
        let per_cpu = self
            .stats
            .get(&(reason as u32), 0)
            .map_err(|source| MapError::Op {
                name: map_names::STATS,
                op: "get",
                source,
            })?;
        Ok(per_cpu.iter().sum())
    }

    /// Every reason's counter, summed over CPUs, in [`Reason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, MapError> {
        Reason::ALL
            .iter()
            .map(|&r| Ok((r, self.counter(r)?)))
            .collect()
    }
}
