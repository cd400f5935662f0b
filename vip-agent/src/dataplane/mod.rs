//! The XDP data plane as the agent sees it: the embedded object, loading it, attaching
//! it to an interface, and running it on test frames (`BPF_PROG_RUN`).
//!
//! Map access lives in [`maps`]; this module touches only programs and links.

pub mod log;
pub mod maps;

use std::{
    fmt, io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfError,
};
use tracing::{debug, info, warn};
use vip_common::{program_names, tail_calls};

pub use self::maps::{FastPath, MapError, Maps, ServiceId, VipStates};
use crate::netdev::Netdev;

/// The XDP object built from `vip-ebpf` by the build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vip-ebpf"));

/// The eBPF object this agent loads (ELF), for tools and tests that read its maps.
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

/// XDP attach mode as the user asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic (SKB) mode if the driver lacks XDP.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (SKB) mode only: works on any interface, slower.
    Skb,
}

/// The kernel hook the data plane runs at (`--attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    /// XDP: the fast path, before the kernel allocates anything for the frame. Needs the
    /// interface's XDP hook to itself.
    #[default]
    Xdp,
    /// tcx ingress, first in the chain, handing everything not ours to the next program:
    /// for an interface whose XDP hook another program owns (Cilium's XDP acceleration).
    /// DSR and local forwarding; IPIP needs XDP.
    Tcx,
}

impl Hook {
    /// The name `--attach`, `status` and the metrics use.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tcx => "tcx",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The mode a program actually got attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Skb,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        })
    }
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
        })
    }
}

/// Which program of the object to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The data plane.
    Vip,
    /// The trivial `XDP_PASS` program (benchmark floor, veth peer).
    Pass,
    /// The data plane at tcx ingress.
    Tcx,
    /// The data plane at tcx ingress for frames whose VLAN tag the NIC stripped only:
    /// beside [`Program::Vip`] when the VIPs are on a VLAN.
    TcxVlan,
    /// The tcx stand-in for another project's program (tests): drops ICMP.
    TcxDropIcmp,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Vip => program_names::VIP,
            Program::Pass => program_names::PASS,
            Program::Tcx => program_names::TCX,
            Program::TcxVlan => program_names::TCX_VLAN,
            Program::TcxDropIcmp => program_names::TCX_DROP_ICMP,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "{what} was refused ({detail}): run vip-agent as root, or with CAP_BPF, CAP_NET_ADMIN \
         and CAP_PERFMON"
    )]
    PermissionDenied { what: &'static str, detail: String },
    #[error("loading the eBPF object failed")]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("the eBPF object has no XDP program named {name:?}")]
    MissingProgram { name: &'static str },
    #[error("loading program {name:?} into the kernel failed")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP to interface {interface:?} in {mode} mode failed{hint}")]
    Attach {
        interface: String,
        mode: AttachMode,
        hint: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching the tcx ingress program to interface {interface:?} failed (tcx needs Linux 6.6 or later)")]
    AttachTcx {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("detaching XDP from interface {interface:?} failed")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("BPF_PROG_RUN of {program:?} failed")]
    TestRun {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("installing program {program:?} as the tail call of the data plane failed")]
    TailCall {
        program: &'static str,
        #[source]
        source: TailCallError,
    },
    #[error("pin path {path}: {why}")]
    PinPath { path: String, why: String },
    #[error("pinning the XDP link at {path}")]
    PinLink {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The first OS error in an error chain whose errno is one of `errnos`.
fn find_os_error<'a>(err: &'a (dyn std::error::Error + 'static), errnos: &[i32]) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.raw_os_error().is_some_and(|n| errnos.contains(&n)) {
                return Some(io);
            }
        }
        cur = e.source();
    }
    None
}

/// Maps a load failure to [`DataplaneError::PermissionDenied`] when the kernel said
/// `EPERM`/`EACCES`: the caller lacks the capabilities to create maps or load programs.
/// A program the verifier rejected also fails with `EACCES`, but with a verifier log:
/// that is a bug in the program, reported as such (with the log), never as missing
/// privileges.
fn permission_denied(err: &(dyn std::error::Error + 'static)) -> Option<DataplaneError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(ProgramError::LoadError { verifier_log, .. }) = e.downcast_ref::<ProgramError>() {
            if !verifier_log.to_string().trim().is_empty() {
                return None;
            }
        }
        cur = e.source();
    }
    find_os_error(err, &[libc::EPERM, libc::EACCES])
        .map(|io| DataplaneError::PermissionDenied { what: "loading the XDP program", detail: format!("bpf(2): {io}") })
}

/// What `BPF_PROG_RUN` returned for one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// The XDP action (`XDP_ABORTED` = 0, `DROP` = 1, `PASS` = 2, `TX` = 3, `REDIRECT` = 4).
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// The kernel's measurement of the run (per run, averaged over `repeat`).
    pub duration: Duration,
    /// Bytes of metadata the program left in front of the frame (XDP; 0 at tc).
    pub meta: u32,
}

/// How the data plane is attached to its interface.
enum Attachment {
    /// Owned by the program object: detached when the [`Dataplane`] drops (tests).
    Owned { interface: String, link: XdpLinkId },
    /// Pinned on bpffs: outlives the agent; [`Dataplane::shutdown`] decides whether to
    /// detach. `companion`: the tcx link of [`Program::TcxVlan`] beside XDP, and its pin.
    Pinned { interface: String, hook: Hook, link: FdLink, pin: PathBuf, companion: Option<(FdLink, PathBuf)> },
}

/// What [`Dataplane::attach_pinned`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Attached afresh at XDP in this mode, and pinned.
    New(AttachedMode),
    /// Attached afresh at tcx ingress, first, and pinned.
    NewTcx,
    /// Took over the link a previous agent pinned, replacing its program atomically.
    Replaced,
}

/// `LinkOrder::first()` puts the program first when it is attached, not for good: a
/// program attached later at the head runs before it, and one that returns `TC_ACT_OK`
/// hides VIP traffic from it. Said in the log, naming the programs ahead (Cilium attaches
/// its own at the tail).
fn warn_unless_first(interface: &str, program: Program) {
    match tcx_ingress_programs(interface) {
        Ok(chain) if chain.first().map(String::as_str) == Some(program.name()) => {}
        Ok(chain) => warn!(
            interface,
            ?chain,
            "another tcx program runs before vip's: if it ends processing (TC_ACT_OK), VIP traffic never reaches vip"
        ),
        Err(error) => warn!(interface, %error, "cannot list the tcx ingress programs"),
    }
}

/// The names of the programs in `interface`'s tcx ingress chain (resolved in the calling
/// thread's network namespace), in the order they run.
pub fn tcx_ingress_programs(interface: &str) -> Result<Vec<String>, ProgramError> {
    let (_, programs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress)?;
    Ok(programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect())
}

/// The name of loaded program `id`, if it is loaded and named.
pub fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
}

/// The `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The loaded data plane: both programs in the kernel, their maps, and (once attached)
/// the link to an interface. Dropping it detaches an owned attachment and frees unpinned
/// maps; pinned maps and links stay (see [`Dataplane::shutdown`]).
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    attached: Option<Attachment>,
    pin_dir: Option<PathBuf>,
    /// The program's debug log, until [`Dataplane::take_log`] hands it to a reader.
    log: Option<log::DataplaneLog>,
}

impl Dataplane {
    /// Loads the embedded object and both of its programs into the kernel. Nothing is
    /// attached yet.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with_log(false)
    }

    /// [`Dataplane::load`], with the program's debug log on or off (see [`log`]).
    pub fn load_with_log(debug_log: bool) -> Result<Self, DataplaneError> {
        let mut ebpf = log::loader(debug_log)
            .load(EBPF_OBJECT)
            .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::Load { source }))?;
        for program in [Program::Vip, Program::Pass] {
            let name = program.name();
            let xdp = xdp_mut(&mut ebpf, name)?;
            xdp.load()
                .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::LoadProgram { name, source }))?;
        }
        install_ipv6_tail_call::<Xdp>(&mut ebpf, program_names::VIP6, tail_calls::PROGS_XDP)?;
        let maps = Maps::take_from(&mut ebpf)?;
        let log = log::reader(&mut ebpf, debug_log);
        debug!("data plane loaded");
        Ok(Self { ebpf, maps, attached: None, pin_dir: None, log })
    }

    /// Loads the data plane with its maps pinned under `dir` (on bpffs): maps a previous
    /// agent pinned there are adopted, with their contents (connection table included),
    /// after a layout check; missing ones are created and pinned. Returns whether the
    /// maps were adopted. If loading fails, the pins this call created are removed.
    pub fn open_pinned(dir: &Path) -> Result<(Self, bool), DataplaneError> {
        let shown = dir.display().to_string();
        let pin_err = |why: String| DataplaneError::PinPath { path: shown.clone(), why };
        // Only the last component is created, and only on a bpffs: a wrong path must not
        // leave directories behind on another file system.
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
        // Mounted at the pin path itself: a mount over its parent would hide what the
        // parent holds.
        let mount_hint = format!(
            "not on a bpf filesystem (use a path under /sys/fs/bpf, or mount one there: mkdir -p {shown} && mount -t \
             bpf bpf {shown})"
        );
        if !parent.is_dir() {
            return Err(pin_err(format!("{} does not exist; {mount_hint}", parent.display())));
        }
        if !is_bpffs(parent) && !is_bpffs(dir) {
            return Err(pin_err(mount_hint));
        }
        if let Err(e) = std::fs::create_dir(dir) {
            match e.kind() {
                io::ErrorKind::AlreadyExists => {}
                io::ErrorKind::PermissionDenied => {
                    return Err(DataplaneError::PermissionDenied {
                        what: "creating the pin path",
                        detail: format!("{shown}: {e}"),
                    })
                }
                _ => return Err(pin_err(format!("cannot create it: {e}"))),
            }
        }
        if !is_bpffs(dir) {
            return Err(pin_err(mount_hint));
        }
        let existed: Vec<&str> = maps::LAYOUTS.iter().map(|l| l.0).filter(|name| dir.join(name).exists()).collect();
        for name in &existed {
            let Some(&(name, ..)) = maps::LAYOUTS.iter().find(|l| l.0 == *name) else { continue };
            maps::check_pinned_layout(name, &dir.join(name))?;
        }
        let adopted = existed.contains(&vip_common::map_names::CONFIG);
        let paths: Vec<(&str, PathBuf)> = maps::LAYOUTS.iter().map(|l| (l.0, dir.join(l.0))).collect();
        let debug_log = log::wanted();
        let mut loader = log::loader(debug_log);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let cleanup = |e: DataplaneError| {
            for (name, path) in &paths {
                if !existed.contains(name) {
                    let _ = std::fs::remove_file(path);
                }
            }
            let _ = std::fs::remove_dir(dir);
            e
        };
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::Load { source }))
            .map_err(cleanup)?;
        for program in [Program::Vip, Program::Pass] {
            let name = program.name();
            let loaded = xdp_mut(&mut ebpf, name).and_then(|xdp| {
                xdp.load().map_err(|source| {
                    permission_denied(&source).unwrap_or(DataplaneError::LoadProgram { name, source })
                })
            });
            loaded.map_err(cleanup)?;
        }
        let maps = Maps::take_from(&mut ebpf).map_err(|e| cleanup(e.into()))?;
        let log = log::reader(&mut ebpf, debug_log);
        info!(pin_path = %shown, adopted, debug_log, "data plane loaded");
        Ok((Self { ebpf, maps, attached: None, pin_dir: Some(dir.to_owned()), log }, adopted))
    }

    /// The program's debug log, if it was loaded with it on: the caller reads it
    /// ([`log::DataplaneLog::run`]).
    pub fn take_log(&mut self) -> Option<log::DataplaneLog> {
        self.log.take()
    }

    /// Where the XDP link to `interface` is pinned.
    pub fn link_pin(dir: &Path, interface: &str) -> PathBuf {
        Self::hook_pin(dir, interface, Hook::Xdp)
    }

    /// Where the link of `hook` on `interface` is pinned.
    pub fn hook_pin(dir: &Path, interface: &str, hook: Hook) -> PathBuf {
        match hook {
            Hook::Xdp => dir.join(format!("link_{interface}")),
            Hook::Tcx => dir.join(format!("tcx_{interface}")),
        }
    }

    /// Where the tcx link of the VLAN companion ([`Program::TcxVlan`]) on `interface` is
    /// pinned.
    pub fn companion_pin(dir: &Path, interface: &str) -> PathBuf {
        dir.join(format!("tcxvlan_{interface}"))
    }

    /// Attaches the data plane to `dev` at `hook` through a pinned link. If a previous
    /// agent left a link pinned for this interface and hook, its program is replaced
    /// atomically (`bpf_link_update`): the interface is never without a program.
    /// Otherwise the program is attached (XDP in `mode`; tcx first in the ingress chain)
    /// and the new link pinned. A link a previous agent pinned at the other hook is
    /// removed only then, so switching hooks leaves no gap either.
    ///
    /// With `vlan` (the VIPs are on a VLAN) at XDP, the VLAN companion
    /// ([`Program::TcxVlan`]) is attached at tcx ingress too, first, and pinned beside
    /// (taken over the same way): XDP cannot read a tag the NIC stripped, tc can. Without
    /// `vlan`, or at tcx, a companion a previous agent pinned is removed last.
    pub fn attach_pinned(
        &mut self,
        dev: &Netdev,
        hook: Hook,
        mode: AttachMode,
        vlan: bool,
    ) -> Result<Attached, DataplaneError> {
        let dir = self.pin_dir.clone().ok_or_else(|| DataplaneError::PinPath {
            path: String::new(),
            why: "the data plane was not opened with a pin path".into(),
        })?;
        let pin = Self::hook_pin(&dir, &dev.name, hook);
        let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::PinLink {
            path: pin.display().to_string(),
            source,
        };
        // The program must be in the kernel before any pin is touched: a program the
        // verifier refuses must fail the start with the previous agent's link (and its
        // program) still attached. (The XDP program was loaded with the object.)
        let companion = hook == Hook::Xdp && vlan;
        // (The companion is loaded when it is attached: a failure there degrades.)
        if hook == Hook::Tcx {
            self.tcx_program(Program::Tcx)?;
        }
        // The IPv6 program goes into the pinned program array only now, right before the
        // link changes (it is verified first, inside): until then the previous agent's
        // program keeps jumping to its own IPv6 program, and a start that fails earlier
        // leaves it so.
        match hook {
            Hook::Xdp => install_ipv6_tail_call::<Xdp>(&mut self.ebpf, program_names::VIP6, tail_calls::PROGS_XDP)?,
            Hook::Tcx => {
                install_ipv6_tail_call::<SchedClassifier>(&mut self.ebpf, program_names::TCX6, tail_calls::PROGS_TCX)?
            }
        }
        let mut done = None;
        if pin.exists() {
            match self.replace_pinned(&pin, hook) {
                Ok(link) => {
                    info!(interface = %dev.name, %hook, pin = %pin.display(), "took over the pinned link (program replaced atomically)");
                    self.attached = Some(Attachment::Pinned {
                        interface: dev.name.clone(),
                        hook,
                        link,
                        pin: pin.clone(),
                        companion: None,
                    });
                    done = Some(Attached::Replaced);
                }
                Err(error) => {
                    // The old link is unusable (its interface was deleted, say): start over.
                    warn!(%error, pin = %pin.display(), "cannot take over the pinned link; attaching afresh");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let attached = match done {
            Some(replaced) => replaced,
            None => {
                let (fd_link, attached) = match hook {
                    Hook::Xdp => {
                        let mode = self.attach(Program::Vip, dev, mode)?;
                        let Some(Attachment::Owned { link: id, .. }) = self.attached.take() else {
                            return Err(pin_err("attach left no link".into()));
                        };
                        let xdp = xdp_mut(&mut self.ebpf, Program::Vip.name())?;
                        let link = xdp.take_link(id).map_err(|e| pin_err(Box::new(e)))?;
                        (FdLink::try_from(link).map_err(|e| pin_err(Box::new(e)))?, Attached::New(mode))
                    }
                    Hook::Tcx => (self.attach_tcx_first(Program::Tcx, dev, &pin)?, Attached::NewTcx),
                };
                let pinned = fd_link.pin(&pin).map_err(|e| pin_err(Box::new(e)))?;
                let link = FdLink::from(pinned);
                self.attached =
                    Some(Attachment::Pinned { interface: dev.name.clone(), hook, link, pin, companion: None });
                attached
            }
        };
        let companion_pin = Self::companion_pin(&dir, &dev.name);
        if companion {
            // Without it the VIPs are still answered at XDP when the tag is in the frame:
            // a kernel without tcx (before 6.6) degrades, it does not fail the start.
            match self.attach_companion(dev, &companion_pin) {
                Ok(link) => {
                    if let Some(Attachment::Pinned { companion: slot, .. }) = &mut self.attached {
                        *slot = Some((link, companion_pin.clone()));
                    }
                }
                Err(error) => warn!(
                    interface = %dev.name,
                    %error,
                    "no tcx companion: frames whose VLAN tag the NIC stripped go unanswered (turn the NIC's VLAN \
                     stripping off: ethtool -K IF rxvlan off)"
                ),
            }
        }
        let companion = self.vlan_companion();
        match (hook, companion) {
            (Hook::Tcx, _) => warn_unless_first(&dev.name, Program::Tcx),
            (Hook::Xdp, true) => warn_unless_first(&dev.name, Program::TcxVlan),
            (Hook::Xdp, false) => {}
        }
        let other = match hook {
            Hook::Xdp => Hook::Tcx,
            Hook::Tcx => Hook::Xdp,
        };
        let stale = Self::hook_pin(&dir, &dev.name, other);
        if stale.exists() {
            // Unpinning the only reference to the link detaches its program.
            let _ = std::fs::remove_file(&stale);
            info!(interface = %dev.name, from = %other, to = %hook, "moved the data plane to the other hook");
        }
        if !companion && companion_pin.exists() {
            let _ = std::fs::remove_file(&companion_pin);
            info!(interface = %dev.name, "removed the tcx companion for stripped VLAN tags");
        }
        Ok(attached)
    }

    /// Whether the VLAN companion ([`Program::TcxVlan`]) runs beside XDP.
    pub fn vlan_companion(&self) -> bool {
        matches!(&self.attached, Some(Attachment::Pinned { companion: Some(_), .. }))
    }

    /// Attaches the VLAN companion ([`Program::TcxVlan`]) at tcx ingress, first, pinned at
    /// `pin`: by taking over the link a previous agent pinned there (atomically), else
    /// afresh.
    fn attach_companion(&mut self, dev: &Netdev, pin: &Path) -> Result<FdLink, DataplaneError> {
        self.load_companion()?;
        let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::PinLink {
            path: pin.display().to_string(),
            source,
        };
        if pin.exists() {
            match self.replace_pinned_tcx(pin, Program::TcxVlan) {
                Ok(link) => return Ok(link),
                Err(error) => {
                    warn!(interface = %dev.name, %error, pin = %pin.display(), "cannot take over the pinned tcx companion; attaching afresh");
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        let link = self.attach_tcx_first(Program::TcxVlan, dev, pin)?;
        let pinned = link.pin(pin).map_err(|e| pin_err(Box::new(e)))?;
        Ok(FdLink::from(pinned))
    }

    /// Loads the tcx programs (the data plane and the test stand-in) into the kernel, for
    /// [`Runner::run`] (attaching loads them by itself).
    pub fn load_tcx(&mut self) -> Result<(), DataplaneError> {
        self.tcx_program(Program::Tcx)?;
        install_ipv6_tail_call::<SchedClassifier>(&mut self.ebpf, program_names::TCX6, tail_calls::PROGS_TCX)?;
        self.tcx_program(Program::TcxDropIcmp)?;
        self.load_companion()
    }

    /// Loads the VLAN companion, and the tcx data plane it jumps to (with its IPv6 part)
    /// into its program array.
    fn load_companion(&mut self) -> Result<(), DataplaneError> {
        self.tcx_program(Program::TcxVlan)?;
        install_ipv6_tail_call::<SchedClassifier>(&mut self.ebpf, program_names::TCX6, tail_calls::PROGS_TCX)?;
        install_tail_call::<SchedClassifier>(
            &mut self.ebpf,
            program_names::TCX,
            tail_calls::PROGS_TCX_VLAN,
            tail_calls::TCX,
        )
    }

    /// The tcx program, loaded into the kernel on first use (only `--attach tcx` and
    /// tests pay for its verification).
    fn tcx_program(&mut self, program: Program) -> Result<&mut SchedClassifier, DataplaneError> {
        let name = program.name();
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|_| DataplaneError::MissingProgram { name })?;
        if tc.fd().is_err() {
            tc.load()
                .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::LoadProgram { name, source }))?;
        }
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|_| DataplaneError::MissingProgram { name })
    }

    /// Attaches the tcx data plane first in `dev`'s ingress chain and returns its link
    /// (to be pinned at `pin`).
    fn attach_tcx_first(&mut self, program: Program, dev: &Netdev, pin: &Path) -> Result<FdLink, DataplaneError> {
        let link_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::PinLink {
            path: pin.display().to_string(),
            source,
        };
        let tc = self.tcx_program(program)?;
        let id = tc
            .attach_with_options(&dev.name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(|source| DataplaneError::AttachTcx { interface: dev.name.clone(), source })?;
        let link = tc.take_link(id).map_err(|e| link_err(Box::new(e)))?;
        info!(interface = %dev.name, ifindex = dev.ifindex, program = program.name(), "tcx ingress attached (first)");
        FdLink::try_from(link).map_err(|e| link_err(Box::new(e)))
    }

    /// Attaches `program` last in `dev`'s tcx ingress chain, for as long as this
    /// [`Dataplane`] lives (tests: the stand-in for another project's program).
    pub fn attach_tcx_last(&mut self, program: Program, dev: &Netdev) -> Result<(), DataplaneError> {
        let tc = self.tcx_program(program)?;
        tc.attach_with_options(&dev.name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::last()))
            .map_err(|source| DataplaneError::AttachTcx { interface: dev.name.clone(), source })?;
        Ok(())
    }

    fn replace_pinned(&mut self, pin: &Path, hook: Hook) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
        match hook {
            Hook::Xdp => {
                let old: FdLink = PinnedLink::from_pin(pin)?.into();
                let xdp = xdp_mut(&mut self.ebpf, Program::Vip.name())?;
                let id = xdp.attach_to_link(XdpLink::try_from(old)?)?;
                Ok(FdLink::try_from(xdp.take_link(id)?)?)
            }
            Hook::Tcx => self.replace_pinned_tcx(pin, Program::Tcx),
        }
    }

    /// Replaces the program of the tcx link pinned at `pin` with `program` atomically.
    fn replace_pinned_tcx(
        &mut self,
        pin: &Path,
        program: Program,
    ) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
        let old: FdLink = PinnedLink::from_pin(pin)?.into();
        let tc = self.tcx_program(program)?;
        let id = tc.attach_to_link(SchedClassifierLink::try_from(old)?)?;
        Ok(FdLink::try_from(tc.take_link(id)?)?)
    }

    /// Stops the data plane. With `keep_forwarding`, the program stays attached and the
    /// link and maps stay pinned, for the next agent to adopt. Otherwise the link is
    /// unpinned (which detaches the program) and the maps are unpinned.
    pub fn shutdown(mut self, keep_forwarding: bool) -> Result<(), DataplaneError> {
        match self.attached.take() {
            Some(Attachment::Pinned { interface, hook, link, pin, companion }) => {
                if keep_forwarding {
                    info!(%interface, %hook, pin = %pin.display(), "leaving the data plane attached and pinned");
                } else {
                    let _ = std::fs::remove_file(&pin);
                    drop(link);
                    if let Some((link, pin)) = companion {
                        let _ = std::fs::remove_file(&pin);
                        drop(link);
                        info!(%interface, "tcx companion for stripped VLAN tags detached");
                    }
                    if hook == Hook::Xdp {
                        info!(%interface, "XDP detached");
                    } else {
                        info!(%interface, "tcx detached");
                    }
                }
            }
            Some(owned @ Attachment::Owned { .. }) => {
                self.attached = Some(owned);
                self.detach()?;
            }
            None => {}
        }
        if let (Some(dir), false) = (&self.pin_dir, keep_forwarding) {
            for (name, ..) in maps::LAYOUTS {
                let _ = std::fs::remove_file(dir.join(name));
            }
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Attaches `program` to `dev` (resolved in the calling thread's network namespace).
    /// With [`AttachMode::Auto`], native mode is tried first and SKB mode is the fallback.
    pub fn attach(&mut self, program: Program, dev: &Netdev, mode: AttachMode) -> Result<AttachedMode, DataplaneError> {
        let xdp = xdp_mut(&mut self.ebpf, program.name())?;
        let attempt = |xdp: &mut Xdp, m: XdpMode| xdp.attach_to_if_index(dev.ifindex, m);
        let (link, attached) = match mode {
            AttachMode::Native => (attempt(xdp, XdpMode::Driver), AttachedMode::Native),
            AttachMode::Skb => (attempt(xdp, XdpMode::Skb), AttachedMode::Skb),
            // A veth takes a native program, but the frames it sends back out with
            // `XDP_TX` (every ARP answer, every DSR frame) reach the peer only if the peer
            // runs an XDP program of its own: they are dropped, counted only as the
            // driver's `xdp_tx_errors`. Generic mode works on a veth as on any device.
            AttachMode::Auto if crate::netdev::driver(&dev.name).ok().flatten().as_deref() == Some("veth") => {
                info!(
                    interface = %dev.name,
                    "a veth: using SKB mode (native XDP_TX reaches the peer only if the peer runs XDP; --xdp-mode native to force it)"
                );
                (attempt(xdp, XdpMode::Skb), AttachedMode::Skb)
            }
            AttachMode::Auto => match attempt(xdp, XdpMode::Driver) {
                Ok(link) => (Ok(link), AttachedMode::Native),
                Err(err) if !is_busy(&err) => {
                    warn!(interface = %dev.name, error = %err, "native XDP refused, using SKB mode");
                    (attempt(xdp, XdpMode::Skb), AttachedMode::Skb)
                }
                Err(err) => (Err(err), AttachedMode::Native),
            },
        };
        let link = link.map_err(|source| DataplaneError::Attach {
            interface: dev.name.clone(),
            mode,
            hint: if is_busy(&source) { ": another XDP program is already attached to it" } else { "" },
            source,
        })?;
        info!(interface = %dev.name, ifindex = dev.ifindex, mode = %attached, program = program.name(), "XDP attached");
        if program == Program::Vip {
            self.attached = Some(Attachment::Owned { interface: dev.name.clone(), link });
        } else {
            // The pass program stays attached for as long as the Dataplane lives.
            let _ = link;
        }
        Ok(attached)
    }

    /// Detaches an owned attachment. A pinned one is left alone: see
    /// [`Dataplane::shutdown`].
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        match self.attached.take() {
            Some(Attachment::Owned { interface, link }) => {
                let xdp = xdp_mut(&mut self.ebpf, Program::Vip.name())?;
                xdp.detach(link).map_err(|source| DataplaneError::Detach { interface: interface.clone(), source })?;
                info!(interface = %interface, "XDP detached");
            }
            pinned @ Some(Attachment::Pinned { .. }) => self.attached = pinned,
            None => {}
        }
        Ok(())
    }

    /// Runs `program` once on `frame` with `BPF_PROG_RUN` and returns the verdict and
    /// the frame as the program left it.
    pub fn test_run(&self, program: Program, frame: &[u8]) -> Result<RunOutcome, DataplaneError> {
        self.runner().run(program, frame)
    }

    /// Like [`Dataplane::test_run`], `repeat` times in the kernel.
    pub fn test_run_repeat(&self, program: Program, frame: &[u8], repeat: u32) -> Result<RunOutcome, DataplaneError> {
        self.runner().run_opts(program, frame, repeat, None)
    }

    /// A handle that runs programs, usable from other threads while the maps are
    /// being written through the `&mut Maps` returned beside it.
    pub fn runner(&self) -> Runner<'_> {
        Runner { ebpf: &self.ebpf }
    }

    /// The runner and the maps at once, for tests that write maps while packets run.
    pub fn split(&mut self) -> (Runner<'_>, &mut Maps) {
        (Runner { ebpf: &self.ebpf }, &mut self.maps)
    }
}

/// Runs the loaded programs on test frames (`BPF_PROG_RUN`).
#[derive(Clone, Copy)]
pub struct Runner<'a> {
    ebpf: &'a Ebpf,
}

impl<'a> Runner<'a> {
    /// Runs `program` once on `frame`.
    pub fn run(&self, program: Program, frame: &[u8]) -> Result<RunOutcome, DataplaneError> {
        self.run_opts(program, frame, 1, None)
    }

    /// Runs `program` on `frame` `repeat` times, as if received on interface
    /// `ingress_ifindex` (in the calling thread's network namespace) when given; the FIB
    /// lookups of IPIP forwarding need a real ingress interface. The kernel does not
    /// restore the frame between repeats, so only paths that leave the frame unchanged
    /// give a meaningful average; loop single runs for the others.
    pub fn run_opts(
        &self,
        program: Program,
        frame: &[u8],
        repeat: u32,
        ingress_ifindex: Option<u32>,
    ) -> Result<RunOutcome, DataplaneError> {
        let name = program.name();
        if matches!(program, Program::Tcx | Program::TcxVlan | Program::TcxDropIcmp) {
            return self.run_tc(program, frame, repeat);
        }
        let xdp: &Xdp = self.program(name)?;
        // Room for encapsulation headers the program may push.
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data_end == the frame's length, and writes the
        // context back relative to the metadata area's start.
        let ctx_in: Vec<u8> = [0u32, frame.len() as u32, 0, ingress_ifindex.unwrap_or(0), 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut ctx_out = vec![0u8; ctx_in.len()];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat,
            ..Default::default()
        };
        let res = xdp.test_run(opts).map_err(|source| DataplaneError::TestRun { program: name, source })?;
        out.truncate(res.data_size_out as usize);
        // The output starts with the metadata area the program left in front of the frame
        // (the companion's mark): `xdp_md.data` in the context written back is its length.
        let meta = ctx_out.get(0..4).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        out.drain(..meta.min(out.len()));
        Ok(RunOutcome { action: res.return_value, frame: out, duration: res.duration, meta: meta as u32 })
    }

    /// The program `name` as its type `T` (`Xdp`, `SchedClassifier`).
    fn program<T>(&self, name: &'static str) -> Result<&'a T, DataplaneError>
    where
        &'a T: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
    {
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DataplaneError::LoadProgram { name, source })
    }

    /// Runs a tcx program (loaded with [`Dataplane::load_tcx`]) on `frame` as an skb,
    /// and reports its verdict in XDP's terms so that one fixture table checks both
    /// hooks: `TCX_NEXT` as `XDP_PASS`, `TC_ACT_SHOT` as `XDP_DROP`, `TC_ACT_REDIRECT`
    /// (what `bpf_redirect` returns; the run does not send) as `XDP_TX`. Any other
    /// return value `v` comes back as [`TC_UNMAPPED`] + `v`, which matches no XDP
    /// action (`TC_ACT_OK`, say, would skip the programs after ours).
    fn run_tc(&self, program: Program, frame: &[u8], repeat: u32) -> Result<RunOutcome, DataplaneError> {
        let name = program.name();
        let tc: &SchedClassifier = self.program(name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() };
        let res = tc.test_run(opts).map_err(|source| DataplaneError::TestRun { program: name, source })?;
        out.truncate(res.data_size_out as usize);
        // linux/bpf.h: TCX_NEXT = -1, TC_ACT_SHOT = 2, TC_ACT_REDIRECT = 7; XDP_DROP = 1,
        // XDP_PASS = 2, XDP_TX = 3.
        let action = match res.return_value as i32 {
            -1 => 2,
            2 => 1,
            7 => 3,
            other => TC_UNMAPPED.wrapping_add(other as u32),
        };
        Ok(RunOutcome { action, frame: out, duration: res.duration, meta: 0 })
    }
}

/// Base of a tcx return value [`Runner`] has no XDP name for.
pub const TC_UNMAPPED: u32 = 0x1000;

impl Drop for Dataplane {
    fn drop(&mut self) {
        if let Err(err) = self.detach() {
            warn!(error = %err, "detaching on drop failed");
        }
    }
}

/// Why a tail-call target could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TailCallError {
    #[error("the program is not loaded")]
    NotLoaded(#[source] ProgramError),
    #[error("its file descriptor could not be duplicated")]
    Fd(#[source] io::Error),
    #[error("the object has no program array {0:?}")]
    NoArray(&'static str),
    #[error("writing the program array")]
    Map(#[source] aya::maps::MapError),
}

/// Loads the IPv6 program `target` (of the type `T` of its entry point) and makes it
/// slot [`tail_calls::IPV6`] of the program array `array`, which the entry point jumps
/// through for every IPv6 frame. With pinned maps the array is the previous agent's,
/// whose program (still attached until ours replaces it) then jumps to ours: both use
/// the same maps. Called at load for a data plane of its own, at attach for a pinned one
/// ([`Dataplane::attach_pinned`]).
fn install_ipv6_tail_call<T>(ebpf: &mut Ebpf, target: &'static str, array: &'static str) -> Result<(), DataplaneError>
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    T: ProgramLoad,
{
    install_tail_call::<T>(ebpf, target, array, tail_calls::IPV6)
}

/// Loads program `target` (of type `T`) and makes it slot `slot` of program array `array`.
fn install_tail_call<T>(
    ebpf: &mut Ebpf,
    target: &'static str,
    array: &'static str,
    slot: u32,
) -> Result<(), DataplaneError>
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    T: ProgramLoad,
{
    let tail = |source| DataplaneError::TailCall { program: target, source };
    let program = ebpf.program_mut(target).ok_or(DataplaneError::MissingProgram { name: target })?;
    let typed: &mut T = program.try_into().map_err(|_| DataplaneError::MissingProgram { name: target })?;
    typed
        .load_program()
        .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::LoadProgram { name: target, source }))?;
    let fd = typed.program_fd().map_err(|e| tail(TailCallError::NotLoaded(e)))?;
    let fd = fd.try_clone().map_err(|e| tail(TailCallError::Fd(e)))?;
    let map = ebpf.map_mut(array).ok_or(tail(TailCallError::NoArray(array)))?;
    let mut progs = aya::maps::ProgramArray::try_from(map).map_err(|e| tail(TailCallError::Map(e)))?;
    progs.set(slot, &fd, 0).map_err(|e| tail(TailCallError::Map(e)))
}

/// The two program types an IPv6 tail call is loaded as.
trait ProgramLoad {
    fn load_program(&mut self) -> Result<(), ProgramError>;
    fn program_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError>;
}

/// The same two methods for both program types (aya gives them no common trait).
macro_rules! program_load {
    ($($t:ty),*) => {$(
        impl ProgramLoad for $t {
            fn load_program(&mut self) -> Result<(), ProgramError> {
                if self.fd().is_ok() {
                    return Ok(());
                }
                self.load()
            }
            fn program_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError> {
                self.fd()
            }
        }
    )*};
}
program_load!(Xdp, SchedClassifier);

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::LoadProgram { name, source })
}

/// Whether an attach failed because the interface already has an XDP program.
fn is_busy(err: &ProgramError) -> bool {
    find_os_error(err, &[libc::EBUSY, libc::EEXIST]).is_some()
}

/// Whether `dir` is on a bpf filesystem.
fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs is plain data filled by the kernel; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
