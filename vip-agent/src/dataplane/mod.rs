//! The XDP data plane as the agent sees it: the embedded object, loading it, attaching
//! it to an interface, and running it on test frames (`BPF_PROG_RUN`).
//!
//! Map access lives in [`maps`]; this module touches only programs and links.

pub mod maps;

use std::{fmt, io, time::Duration};

use aya::{
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{debug, info, warn};
use vip_common::program_names;

pub use self::maps::{MapError, Maps};
use crate::netdev::Netdev;

/// The XDP object built from `vip-ebpf` by the build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vip-ebpf"));

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
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Vip => program_names::VIP,
            Program::Pass => program_names::PASS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the XDP program was refused ({detail}): run vip-agent as root, or with \
         CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    PermissionDenied { detail: String },
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
fn permission_denied(err: &(dyn std::error::Error + 'static)) -> Option<DataplaneError> {
    find_os_error(err, &[libc::EPERM, libc::EACCES])
        .map(|io| DataplaneError::PermissionDenied { detail: format!("bpf(2): {io}") })
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
}

/// The loaded data plane: both programs in the kernel, their maps, and (once attached)
/// the link to an interface. Dropping it detaches the program and frees the maps.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    attached: Option<(String, aya::programs::xdp::XdpLinkId)>,
}

impl Dataplane {
    /// Loads the embedded object and both of its programs into the kernel. Nothing is
    /// attached yet.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::Load { source }))?;
        for program in [Program::Vip, Program::Pass] {
            let name = program.name();
            let xdp = xdp_mut(&mut ebpf, name)?;
            xdp.load()
                .map_err(|source| permission_denied(&source).unwrap_or(DataplaneError::LoadProgram { name, source }))?;
        }
        let maps = Maps::take_from(&mut ebpf)?;
        debug!("data plane loaded");
        Ok(Self { ebpf, maps, attached: None })
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
            self.attached = Some((dev.name.clone(), link));
        } else {
            // The pass program stays attached for as long as the Dataplane lives.
            let _ = link;
        }
        Ok(attached)
    }

    /// Detaches the data plane from its interface, if attached.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some((interface, link)) = self.attached.take() {
            let xdp = xdp_mut(&mut self.ebpf, Program::Vip.name())?;
            xdp.detach(link).map_err(|source| DataplaneError::Detach { interface: interface.clone(), source })?;
            info!(interface = %interface, "XDP detached");
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

impl Runner<'_> {
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
        let xdp: &Xdp = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DataplaneError::LoadProgram { name, source })?;
        // Room for encapsulation headers the program may push.
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data_end == the frame's length.
        let ctx: Option<Vec<u8>> = ingress_ifindex
            .map(|ifindex| [0u32, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect());
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat,
            ..Default::default()
        };
        let res = xdp.test_run(opts).map_err(|source| DataplaneError::TestRun { program: name, source })?;
        out.truncate(res.data_size_out as usize);
        Ok(RunOutcome { action: res.return_value, frame: out, duration: res.duration })
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if let Err(err) = self.detach() {
            warn!(error = %err, "detaching on drop failed");
        }
    }
}

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
