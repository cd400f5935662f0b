//! The data plane's debug log: rare events the XDP program reports through aya-log
//! (malformed frames by kind, no backend, IPIP failures; `vip_common::Reason::is_rare`),
//! forwarded into the agent's tracing output under the target `vip_ebpf`.
//!
//! On only when the agent's filter enables debug for `vip_ebpf` (e.g.
//! `RUST_LOG=info,vip_ebpf=debug`): the level is fixed when the program is loaded
//! (the `AYA_LOG_LEVEL` global, read-only to the program), so with it off the verifier
//! removes the logging code and the hot path pays nothing. Records reach `tracing`
//! through the `log` crate's bridge that tracing-subscriber installs, with the verdict's
//! reason, which the program sends as its number, named ([`name_reason`]).

use std::{borrow::Cow, os::fd::AsRawFd};

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

/// The global aya-log-ebpf reads its level from.
const LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// Whether the agent's filter wants the program's debug records.
pub fn wanted() -> bool {
    tracing::enabled!(target: "vip_ebpf", tracing::Level::DEBUG)
}

/// The two levels the program is loaded with: off (0), or debug. Statics, because the
/// loader borrows the value.
static LEVEL: [u8; 2] = [0, aya_log::Level::Debug as u8];

/// A loader with the program's log level fixed: debug, or off.
pub fn loader(debug_log: bool) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.override_global(LEVEL_GLOBAL, &LEVEL[usize::from(debug_log)], true);
    loader
}

/// The reader of the program's log ring buffer, when loaded with the log on.
pub fn reader(ebpf: &mut Ebpf, debug_log: bool) -> Option<DataplaneLog> {
    if !debug_log {
        return None;
    }
    match EbpfLogger::init_with_logger(ebpf, Named) {
        Ok(logger) => Some(DataplaneLog { logger }),
        Err(error) => {
            warn!(%error, "the data plane's debug log is not available");
            None
        }
    }
}

/// The program's log ring buffer and its reader.
pub struct DataplaneLog {
    logger: EbpfLogger<Named>,
}

/// Hands the program's records to the `log` crate's logger with their reason named.
pub struct Named;

impl log::Log for Named {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let text = name_reason(&text);
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{text}"))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// `frame reason N ...` (how the program logs a verdict: see vip-ebpf's `log.rs`) with
/// `reason N` replaced by the reason's name (`frame arp_malformed ...`); any other text,
/// or a number no reason has, unchanged.
pub fn name_reason(text: &str) -> Cow<'_, str> {
    let Some(rest) = text.strip_prefix("frame reason ") else { return Cow::Borrowed(text) };
    let (number, tail) = rest.split_once(' ').map_or((rest, ""), |(n, t)| (n, t));
    match number.parse::<usize>().ok().and_then(|n| vip_common::Reason::ALL.get(n)) {
        Some(reason) if tail.is_empty() => Cow::Owned(format!("frame {}", reason.name())),
        Some(reason) => Cow::Owned(format!("frame {} {tail}", reason.name())),
        None => Cow::Borrowed(text),
    }
}

impl DataplaneLog {
    /// Forwards every record waiting in the ring buffer (for callers that poll it
    /// themselves, as the benchmark does).
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Forwards records until the ring buffer can no longer be polled.
    pub async fn run(self) {
        let fd = self.logger.as_raw_fd();
        // SAFETY: the descriptor is the ring buffer map's, owned by `self.logger`, which
        // the AsyncFd owns: it stays open for as long as it is registered.
        let mut ready = match unsafe { AsyncFd::register(self) } {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e.into_parts().1, fd, "cannot poll the data plane's log");
                return;
            }
        };
        debug!("reading the data plane's debug log");
        loop {
            let Ok(mut guard) = ready.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}

impl AsRawFd for DataplaneLog {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.logger.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::name_reason;

    #[test]
    fn a_logged_reason_number_is_named() {
        assert_eq!(name_reason("frame reason 5 on ifindex 2"), "frame arp_malformed on ifindex 2");
        assert_eq!(name_reason("frame reason 44"), "frame untagged_at_xdp");
        assert_eq!(name_reason("frame reason 200 on ifindex 2"), "frame reason 200 on ifindex 2");
        assert_eq!(name_reason("something else"), "something else");
    }
}
