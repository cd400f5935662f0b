//! CPU time of threads and processes, from the scheduler's own nanosecond counters.
//!
//! `/proc/PID/schedstat` starts with the task's total run time in ns (`sum_exec_runtime`,
//! kept whether or not schedstats are enabled). On this kernel IRQ time accounting is
//! off, so softirq and interrupt work that happens to run on top of a task is charged to
//! it: a NAPI thread's figure includes everything done while it polls, and nothing done
//! elsewhere.

use std::collections::BTreeSet;

/// The lab's split of this machine: the last CPU is the load-balancing node's, the others
/// (at least CPU 0) are the client's and the backends'.
pub struct Split {
    pub lb: usize,
    pub rest: Vec<usize>,
}

impl Split {
    pub fn of_this_machine() -> Self {
        let n = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        let lb = n.saturating_sub(1);
        Self { lb, rest: (0..lb.max(1)).collect() }
    }

    /// `taskset -c` syntax for `cpus`.
    pub fn list(cpus: &[usize]) -> String {
        cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    }

    /// The hex mask of `cpus`, as `rps_cpus` takes it.
    pub fn mask(cpus: &[usize]) -> String {
        format!("{:x}", cpus.iter().fold(0u64, |m, &c| m | 1 << c))
    }
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
pub fn pin(tid: u32, cpus: &[usize]) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, filled by CPU_SET below.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c is below the machine's CPU count, far below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: set is a valid cpu_set_t of the size given.
    if unsafe { libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(format!("sched_setaffinity({tid}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs kernel thread `tid` under SCHED_FIFO at `priority`: a threaded NAPI poller then
/// preempts ordinary tasks the way softirq processing does, instead of waiting for its
/// turn behind whatever else runs on its core.
pub fn realtime(tid: u32, priority: i32) -> Result<(), String> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: param is a valid sched_param; tid names a thread.
    if unsafe { libc::sched_setscheduler(tid as libc::pid_t, libc::SCHED_FIFO, &param) } != 0 {
        return Err(format!("sched_setscheduler({tid}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Restricts every thread of process `pid` to `cpus` (threads it starts later inherit it).
pub fn pin_process(pid: u32, cpus: &[usize]) -> Result<(), String> {
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        if let Some(tid) = entry.map_err(|e| e.to_string())?.file_name().to_str().and_then(|t| t.parse().ok()) {
            pin(tid, cpus)?;
        }
    }
    Ok(())
}

/// Total run time of one thread (task), in ns.
pub fn thread_ns(tid: u32) -> Result<u64, String> {
    read_schedstat(&format!("/proc/{tid}/schedstat"))
}

/// Total run time of every thread of process `pid`, in ns (threads that already exited
/// are not counted: the processes measured here keep theirs for their whole life).
pub fn process_ns(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let path = entry.map_err(|e| e.to_string())?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        total += read_schedstat(&path.display().to_string()).unwrap_or(0);
    }
    Ok(total)
}

fn read_schedstat(path: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    text.split_whitespace().next().and_then(|v| v.parse().ok()).ok_or_else(|| format!("{path}: {text:?}"))
}

/// Busy time (everything but idle and iowait) of each CPU so far, in ns, from
/// `/proc/stat` (USER_HZ ticks: 10 ms resolution, fine over seconds).
pub fn busy_ns_per_cpu() -> Vec<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            let total: u64 = f.iter().take(8).sum();
            let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
            (total - idle) * 1_000_000_000 / hz
        })
        .collect()
}

/// Inter-processor interrupts so far (rescheduling and function-call IPIs, all CPUs):
/// each cross-core hand-off of a frame costs one, and in a VM each is a VM exit.
pub fn ipis() -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .filter(|l| matches!(l.trim_start().split(':').next(), Some("RES" | "CAL")))
        .flat_map(|l| l.split_whitespace().skip(1).map_while(|v| v.parse::<u64>().ok()).collect::<Vec<_>>())
        .sum()
}

/// Run time (ns) so far of every loaded BPF program named in `names`, as the kernel
/// counts it while run-time statistics are on ([`aya::sys::enable_stats`]; 0 otherwise).
pub fn bpf_run_ns(names: &[&str]) -> u64 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| names.contains(&n)))
        .map(|p| p.run_time().as_nanos() as u64)
        .sum()
}

/// The pids of every threaded-NAPI kernel thread (`napi/<dev>-<id>`) now running.
pub fn napi_threads() -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("napi/")))
        .collect()
}
