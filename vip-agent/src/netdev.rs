//! Network interfaces: name validation, index and MAC address lookup.
//!
//! Lookups go through `if_nametoindex(3)` and the `SIOCGIFHWADDR` ioctl rather than
//! `/sys/class/net`, because they answer for the network namespace of the calling
//! thread; sysfs answers for the namespace it was mounted in.

use std::{ffi::CString, fmt, io, net::Ipv4Addr};

/// Linux's `IFNAMSIZ`, including the terminating NUL.
const IFNAMSIZ: usize = 16;
/// `ARPHRD_ETHER`: the only link type that carries ARP the way the data plane expects.
const ARPHRD_ETHER: u16 = 1;

/// An interface the agent can attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netdev {
    pub name: String,
    pub ifindex: u32,
    pub mac: MacAddr,
    /// The interface's primary IPv4 address, if it has one.
    pub ipv4: Option<Ipv4Addr>,
}

/// An Ethernet MAC address, in wire order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("invalid interface name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("interface {name:?} not found")]
    NotFound { name: String },
    #[error("interface {name:?} is not an Ethernet interface (link type {link_type})")]
    NotEthernet { name: String, link_type: u16 },
    #[error("reading the MAC address of interface {name:?} failed")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Checks `name` the way the kernel would, so a bad value is reported as such rather
/// than as "not found".
pub fn validate_name(name: &str) -> Result<(), NetdevError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() >= IFNAMSIZ {
        "longer than 15 bytes"
    } else if name == "." || name == ".." {
        "reserved name"
    } else if name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0) {
        "contains '/', ':', NUL or whitespace"
    } else {
        return Ok(());
    };
    Err(NetdevError::InvalidName { name: name.to_owned(), why })
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Resolves `name` in the calling thread's network namespace.
pub fn lookup(name: &str) -> Result<Netdev, NetdevError> {
    validate_name(name)?;
    let c_name =
        CString::new(name).map_err(|_| NetdevError::InvalidName { name: name.to_owned(), why: "contains NUL" })?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        return Err(NetdevError::NotFound { name: name.to_owned() });
    }
    let not_found = || NetdevError::NotFound { name: name.to_owned() };
    let hw = ifreq_ioctl(name, libc::SIOCGIFHWADDR)?.ok_or_else(not_found)?;
    // SAFETY: SIOCGIFHWADDR fills the ifru_hwaddr member of the union.
    let sa = unsafe { hw.ifr_ifru.ifru_hwaddr };
    if sa.sa_family != ARPHRD_ETHER {
        return Err(NetdevError::NotEthernet { name: name.to_owned(), link_type: sa.sa_family });
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *dst = *src as u8;
    }
    let ipv4 = ifreq_ioctl(name, libc::SIOCGIFADDR)?.map(|r| {
        // SAFETY: for an AF_INET socket, SIOCGIFADDR fills ifru_addr with a sockaddr_in,
        // which has the same size as sockaddr.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute_copy(&r.ifr_ifru.ifru_addr) };
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
    });
    Ok(Netdev { name: name.to_owned(), ifindex, mac: MacAddr(mac), ipv4 })
}

/// `ETHTOOL_GGRO` (`linux/ethtool.h`): read whether generic receive offload is on.
const ETHTOOL_GGRO: u32 = 0x2b;
/// `ETHTOOL_GFLAGS`: read the device flags, among them `ETH_FLAG_LRO`.
const ETHTOOL_GFLAGS: u32 = 0x25;
/// `ETH_FLAG_LRO` in `ETHTOOL_GFLAGS`' value: large receive offload.
const ETH_FLAG_LRO: u32 = 1 << 15;

/// Which receive offloads that merge segments into frames larger than the MTU are on
/// for an interface: GRO in the kernel, LRO in the NIC (`ethtool -k`'s
/// `generic-receive-offload` and `large-receive-offload`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merging {
    pub gro: bool,
    pub lro: bool,
}

/// [`Merging`] for interface `name`, through the `SIOCETHTOOL` ioctl: two values, where
/// the ethtool netlink family would need a generic-netlink client we do not otherwise
/// have. `None`: the interface is gone. A device without LRO answers `EOPNOTSUPP` for
/// its flags: LRO off.
pub fn receive_merging(name: &str) -> Result<Option<Merging>, NetdevError> {
    // `struct ethtool_value`: the command in, the value out.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let read = |cmd: u32| -> Result<Option<u32>, NetdevError> {
        let mut value = EthtoolValue { cmd, data: 0 };
        let data = std::ptr::addr_of_mut!(value).cast::<libc::c_char>();
        // SAFETY: SIOCETHTOOL reads ifru_data as a pointer to the ethtool_value above,
        // which outlives the call.
        let done = ifreq_ioctl_with(name, libc::SIOCETHTOOL as libc::Ioctl, |ifr| ifr.ifr_ifru.ifru_data = data)?;
        Ok(done.map(|_| value.data))
    };
    let Some(gro) = read(ETHTOOL_GGRO)? else { return Ok(None) };
    let lro = match read(ETHTOOL_GFLAGS) {
        Ok(flags) => flags.is_some_and(|f| f & ETH_FLAG_LRO != 0),
        Err(NetdevError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
        Err(e) => return Err(e),
    };
    Ok(Some(Merging { gro: gro != 0, lro }))
}

/// Whether interface `name` is administratively up and has carrier (`IFF_UP` and
/// `IFF_RUNNING`, the operational state). `false` if it does not exist.
pub fn is_up(name: &str) -> bool {
    match ifreq_ioctl(name, libc::SIOCGIFFLAGS) {
        // SAFETY: SIOCGIFFLAGS fills the ifru_flags member of the union.
        Ok(Some(r)) => {
            let flags = unsafe { r.ifr_ifru.ifru_flags } as libc::c_int;
            flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
        }
        _ => false,
    }
}

/// Whether interface `name`'s NIC takes received VLAN tags out of the frame into
/// metadata (`rxvlan`, `NETIF_F_HW_VLAN_CTAG_RX`), where XDP cannot read them; through
/// the ethtool ioctl's `ETHTOOL_GFLAGS` (`ETH_FLAG_RXVLAN`, include/uapi/linux/ethtool.h).
/// `Ok(None)` if the interface is gone or the driver does not say.
pub fn strips_vlan_tags(name: &str) -> Result<Option<bool>, NetdevError> {
    /// `struct ethtool_value`: a command and its 32-bit answer.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETH_FLAG_RXVLAN: u32 = 1 << 8;
    let mut value = EthtoolValue { cmd: ETHTOOL_GFLAGS, data: 0 };
    let answered = ethtool(name, &mut value)?;
    Ok(answered.then_some(value.data & ETH_FLAG_RXVLAN != 0))
}

/// The name of interface `name`'s driver (`veth`, `virtio_net`, `mlx5_core`, ...), as
/// `ethtool -i` shows it: the ethtool ioctl's `ETHTOOL_GDRVINFO` (`struct
/// ethtool_drvinfo`, include/uapi/linux/ethtool.h). `Ok(None)` if the interface is gone
/// or has no driver information (a bridge answers `bridge`; some virtual devices
/// nothing).
pub fn driver(name: &str) -> Result<Option<String>, NetdevError> {
    /// `struct ethtool_drvinfo`: the command, then fixed-size strings and counters
    /// (196 bytes); only `driver` is read.
    #[repr(C)]
    struct EthtoolDrvinfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    const _: () = assert!(std::mem::size_of::<EthtoolDrvinfo>() == 196);
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    // SAFETY: integers and byte arrays only: all-zero is a valid value.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let answered = ethtool(name, &mut info)?;
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(answered.then(|| String::from_utf8_lossy(&info.driver[..len]).into_owned()).filter(|d| !d.is_empty()))
}

/// Runs the ethtool ioctl (`SIOCETHTOOL`) for `name` with `command` as its data: a
/// `#[repr(C)]` ethtool struct whose first field is its `ETHTOOL_*` command, which the
/// kernel fills in place. Whether it answered: not if the interface is gone or the
/// driver does not implement the command (`EOPNOTSUPP`).
fn ethtool<T>(name: &str, command: &mut T) -> Result<bool, NetdevError> {
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
    let ptr = command as *mut T as *mut libc::c_char;
    // The kernel reads the command and writes the answer through the pointer in ifr_data.
    match ifreq_ioctl_with(name, SIOCETHTOOL, |ifr| ifr.ifr_ifru.ifru_data = ptr) {
        Ok(answer) => Ok(answer.is_some()),
        Err(NetdevError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs an `ifreq` ioctl for `name` on an AF_INET socket. `Ok(None)` when the kernel says
/// the interface is gone (`ENODEV`) or has no such address (`EADDRNOTAVAIL`).
fn ifreq_ioctl(name: &str, request: libc::Ioctl) -> Result<Option<libc::ifreq>, NetdevError> {
    ifreq_ioctl_with(name, request, |_| {})
}

/// [`ifreq_ioctl`] with the request's own fields set by `prepare` (the name is set).
fn ifreq_ioctl_with(
    name: &str,
    request: libc::Ioctl,
    prepare: impl FnOnce(&mut libc::ifreq),
) -> Result<Option<libc::ifreq>, NetdevError> {
    let io_err = |source| NetdevError::Io { name: name.to_owned(), source };
    // SAFETY: plain socket(2) call; the fd is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    prepare(&mut ifr);
    // SAFETY: fd is a socket, ifr is a properly initialised ifreq with a NUL-terminated
    // name (validate_name bounded its length below IFNAMSIZ).
    let rc = unsafe { libc::ioctl(fd, request, &mut ifr) };
    let err = io::Error::last_os_error();
    // SAFETY: fd was returned by socket(2) above and is not used afterwards.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return match err.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL) => Ok(None),
            _ => Err(io_err(err)),
        };
    }
    Ok(Some(ifr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_the_kernel_would_reject() {
        for bad in ["", "a-name-that-is-too-long", ".", "..", "eth/0", "eth 0", "eth:0"] {
            assert!(matches!(validate_name(bad), Err(NetdevError::InvalidName { .. })), "{bad:?} should be rejected");
        }
        for good in ["eth0", "enp0s31f6", "veth-node1", "a"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn lookup_of_a_missing_interface_names_it() {
        let err = lookup("vipnosuchif0").unwrap_err();
        assert_eq!(err.to_string(), "interface \"vipnosuchif0\" not found");
    }

    #[test]
    fn loopback_is_not_ethernet() {
        assert!(matches!(lookup("lo"), Err(NetdevError::NotEthernet { link_type: 772, .. })));
    }

    #[test]
    fn mac_formats_like_ip_link() {
        assert_eq!(MacAddr([0x02, 0, 0xab, 1, 2, 0xff]).to_string(), "02:00:ab:01:02:ff");
    }
}
