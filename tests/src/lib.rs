//! Test support for vip: frame builders and a reference model of the data plane
//! ([`frames`]), network namespaces with cleanup by name ([`netns`]), and helpers to run
//! the agent binary ([`agent`]), the fixture tables' check ([`fixture`]). The fixture tests, the namespace tests, the benchmarks
//! and the demo all build on these.

pub mod agent;
pub mod apilab;
pub mod fixture;
pub mod frames;
pub mod https;
pub mod lab;
pub mod netns;
pub mod perpacket;
pub mod pki;
pub mod routers;
pub mod sampler;

/// Pins the calling thread to CPU `cpu` (the per-CPU flow-cache tests run frames on
/// chosen CPUs). Panics if the kernel refuses.
pub fn run_on_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only changes this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU {cpu}");
    }
}

/// The XDP actions, as the kernel numbers them.
pub mod xdp {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;

    pub fn name(action: u32) -> &'static str {
        match action {
            ABORTED => "XDP_ABORTED",
            DROP => "XDP_DROP",
            PASS => "XDP_PASS",
            TX => "XDP_TX",
            4 => "XDP_REDIRECT",
            _ => "XDP_?",
        }
    }
}

/// A small deterministic PRNG (SplitMix64) so the random-frame test is reproducible from
/// its seed on every machine and Rust version.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant for test generation.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }
}

/// Whether the running kernel is at least `major.minor` (from `/proc/sys/kernel/osrelease`):
/// tests of a kernel feature newer than the project's floor (tcx: 6.6) skip, saying so,
/// on an older one.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

/// [`kernel_at_least`] for tcx (Linux 6.6), with the skip said on stderr.
pub fn kernel_has_tcx() -> bool {
    let ok = kernel_at_least(6, 6);
    if !ok {
        eprintln!("tcx needs Linux 6.6 or later: skipped");
    }
    ok
}
