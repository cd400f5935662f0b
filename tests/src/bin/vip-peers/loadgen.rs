//! The client's load generator: one HTTP request per new TCP connection (connect, send,
//! read the answer to EOF, close), so every figure counts new connections.
//!
//! Two shapes, both with plain std threads inside the client namespace:
//! - [`closed_loop`]: `conns` threads, each starting its next connection as soon as the
//!   previous one ends: saturation.
//! - [`open_loop`]: requests started on a fixed schedule (`rate` per second) whatever the
//!   answers do: latency at a fixed offered load. A request's latency runs from its own
//!   start; how late starts were against the schedule is reported beside it, so a
//!   generator that could not keep up is visible rather than hidden.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// The whole request: small, and `Connection: close` so the responder closes first.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n";
/// Bounds every connect and read: a lost SYN is retransmitted after 1 s, so 3 s lets two
/// retransmits count as (slow) successes, as a client would see them, and still ends.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// A start later than this against the open-loop schedule counts as "late".
const LATE: Duration = Duration::from_millis(1);

/// One request on a new connection; Ok when the answer was a 200.
pub fn request(addr: SocketAddr) -> Result<(), String> {
    request_named(addr).map(drop)
}

/// One request on a new connection; the answering backend's name (the body) on a 200.
pub fn request_named(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(REQUEST).map_err(|e| format!("write {addr}: {e}"))?;
    let mut buf = [0u8; 256];
    let mut len = 0;
    loop {
        match s.read(&mut buf[len..]).map_err(|e| format!("read {addr}: {e}"))? {
            0 => break,
            n => len = (len + n).min(buf.len() - 1),
        }
    }
    let answer = String::from_utf8_lossy(&buf[..len]);
    match (answer.starts_with("HTTP/1.1 200"), answer.split_once("\r\n\r\n")) {
        (true, Some((_, body))) => Ok(body.trim().to_owned()),
        _ => Err(format!("bad answer from {addr}: {answer:?}")),
    }
}

/// What a run measured inside its window.
#[derive(Debug, Default, Clone)]
pub struct Run {
    /// Latency of every request that completed (successfully) in the window, in µs.
    pub latencies_us: Vec<u32>,
    pub failed: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    /// Open loop only: requests that started more than [`LATE`] after their slot.
    pub late: u64,
}

impl Run {
    pub fn per_second(&self) -> f64 {
        self.latencies_us.len() as f64 / self.window.as_secs_f64()
    }

    /// The `q`-quantile (0..=1) of the latencies, in µs.
    pub fn quantile_us(&self, q: f64) -> Option<u32> {
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).copied()
    }

    fn absorb(&mut self, other: Run) {
        self.latencies_us.extend(other.latencies_us);
        self.failed += other.failed;
        self.late += other.late;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// When the measured window opens and closes; a thread keeps only requests that ended
/// inside it, so warm-up and wind-down are left out.
#[derive(Clone, Copy)]
pub struct Window {
    pub open: Instant,
    pub close: Instant,
}

impl Window {
    /// Starts `warmup` from now and lasts `length`.
    pub fn after(warmup: Duration, length: Duration) -> Self {
        let open = Instant::now() + warmup;
        Self { open, close: open + length }
    }
}

/// Where the load runs: a namespace, and the CPUs its threads are confined to.
pub struct Client<'a> {
    pub ns: &'a str,
    pub cpus: &'a [usize],
}

/// Runs `worker(index)` on `threads` threads inside the client's namespace and CPUs and
/// merges their runs.
fn on_threads(
    client: &Client<'_>,
    threads: usize,
    window: Window,
    worker: impl Fn(usize, &AtomicBool) -> Run + Sync,
) -> Result<Run, String> {
    let stop = AtomicBool::new(false);
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (worker, stop) = (&worker, &stop);
                s.spawn(move || -> Result<Run, String> {
                    tests::netns::enter_by_name(client.ns)?;
                    crate::cpu::pin(0, client.cpus)?;
                    Ok(worker(i, stop))
                })
            })
            .collect();
        std::thread::sleep(window.close.saturating_duration_since(Instant::now()));
        stop.store(true, Ordering::SeqCst);
        handles.into_iter().map(|h| h.join().map_err(|_| "a load thread panicked".to_string())?).collect::<Vec<_>>()
    });
    let mut total = Run { window: window.close - window.open, ..Run::default() };
    for run in runs {
        total.absorb(run?);
    }
    Ok(total)
}

/// Records one request's outcome if it ended inside the window.
fn record(run: &mut Run, window: &Window, started: Instant, outcome: Result<(), String>) {
    let ended = Instant::now();
    if ended < window.open || ended > window.close {
        return;
    }
    match outcome {
        Ok(()) => run.latencies_us.push((ended - started).as_micros().min(u32::MAX as u128) as u32),
        Err(e) => {
            run.failed += 1;
            run.first_error.get_or_insert(e);
        }
    }
}

/// Saturation: `conns` connections in flight at all times until the window closes.
pub fn closed_loop(client: &Client<'_>, targets: &[SocketAddr], conns: usize, window: Window) -> Result<Run, String> {
    on_threads(client, conns, window, |i, stop| {
        let mut run = Run::default();
        for n in i.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let t = Instant::now();
            record(&mut run, &window, t, request(targets[n % targets.len()]));
        }
        run
    })
}

/// A fixed offered load of `rate` new connections per second, spread over `threads`
/// threads (thread `i` takes slots `i`, `i + threads`, …).
pub fn open_loop(
    client: &Client<'_>,
    targets: &[SocketAddr],
    rate: u32,
    threads: usize,
    window: Window,
) -> Result<Run, String> {
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    on_threads(client, threads, window, |i, stop| {
        // Precise sleeps: the default 50 µs timer slack would blur the schedule.
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
        let mut run = Run::default();
        for slot in (i..).step_by(threads) {
            let due = start + interval * slot as u32;
            if stop.load(Ordering::Relaxed) || due > window.close {
                break;
            }
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let t = Instant::now();
            if t - due > LATE && t >= window.open {
                run.late += 1;
            }
            record(&mut run, &window, t, request(targets[slot % targets.len()]));
        }
        run
    })
}

/// A paced stream for failover runs: a new connection every `interval` on a pool of
/// threads (so a hanging request does not delay the next ones), each judged by
/// `attempt`, until stopped. Returns when each request started and whether it succeeded.
pub struct Stream {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<(Instant, bool)>>>,
}

impl Stream {
    pub fn start<F>(ns: &str, interval: Duration, pool: usize, attempt: F) -> Self
    where
        F: Fn() -> bool + Send + Sync + Clone + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let handles = (0..pool)
            .map(|i| {
                let (stop, ns, attempt) = (stop.clone(), ns.to_owned(), attempt.clone());
                std::thread::spawn(move || {
                    let mut timeline = Vec::new();
                    if tests::netns::enter_by_name(&ns).is_err() {
                        return timeline;
                    }
                    for slot in (i..).step_by(pool) {
                        let due = start + interval * slot as u32;
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        timeline.push((due, attempt()));
                    }
                    timeline
                })
            })
            .collect();
        Self { stop, handles }
    }

    /// Stops the stream; every request's start and outcome, in start order.
    pub fn stop(mut self) -> Vec<(Instant, bool)> {
        self.stop.store(true, Ordering::SeqCst);
        let handles = std::mem::take(&mut self.handles);
        let mut all: Vec<(Instant, bool)> = handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
        all.sort_by_key(|(t, _)| *t);
        all
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
