//! Rare data-plane events, logged through aya-log into the agent's tracing output at
//! debug level: malformed frames by kind, a missing backend or configuration, every IPIP
//! failure or refusal, truncated ICMP quotes (`Reason::is_rare`).
//!
//! Zero cost when off: the level is a global the agent fixes when it loads the program
//! (`AYA_LOG_LEVEL`, 0 unless `RUST_LOG` enables debug for `vip_ebpf`), so the verifier
//! sees the check below as constant and removes the logging code altogether. When on,
//! only frames with a rare verdict pay for a record in the ring buffer.

use aya_log_ebpf::{
    debug,
    macro_support::{level_enabled, Level},
};
use vip_common::Reason;

use crate::ctx::Packet;

/// Logs the frame's verdict if it is a rare one and debug logging is on. The reason goes
/// out as its number, which the agent's reader names (`vip_agent::dataplane::log`): a
/// name is a string of a different length per reason, and copying it into the record
/// made the verifier walk the copy once per reason on every path that ends here (the
/// program with its log on outgrew what the kernel verifies without interruption).
#[inline(always)]
pub fn rare(ctx: &impl Packet, reason: Reason) {
    if !level_enabled(Level::Debug) || !reason.is_rare() {
        return;
    }
    debug!(ctx, "frame reason {} on ifindex {}", reason as u8, ctx.ingress_ifindex());
}
