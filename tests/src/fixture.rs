//! The check every fixture table runs: one frame through a program of the real object by
//! `BPF_PROG_RUN`, then the action, the counter of the expected reason and the output
//! frame compared with the row's.

use std::net::IpAddr;

use vip_agent::{
    balancer::BackendSpec,
    dataplane::{Dataplane, FastPath, Program},
};
use vip_common::{Reason, VipState};

use crate::xdp;

/// What a row expects: the action (in XDP's terms, also for the tcx program), the reason
/// whose counter moves by exactly one, and the output frame (`None`: the input, unchanged).
pub struct Expect {
    pub action: u32,
    pub reason: Reason,
    pub output: Option<Vec<u8>>,
}

/// `XDP_PASS` under `reason`, the frame untouched.
pub fn pass(reason: Reason) -> Expect {
    Expect { action: xdp::PASS, reason, output: None }
}

/// Runs `input` through `program` and compares. `Ok` with the output frame when the row
/// holds, else one line naming the row (`name`) and every difference.
pub fn run_and_check(
    dp: &Dataplane,
    program: Program,
    name: &str,
    input: &[u8],
    want: &Expect,
) -> Result<Vec<u8>, String> {
    // Rows are written for XDP. An untagged frame for a VIP on a VLAN is `untagged_at_xdp`
    // there (its tag may be in metadata XDP cannot read) and `other_segment` at tcx, which
    // reads the tag from the skb.
    let reason = match (program, want.reason) {
        (Program::Tcx, Reason::UntaggedAtXdp) => Reason::OtherSegment,
        (_, reason) => reason,
    };
    let before = dp.maps().counter(reason).map_err(|e| e.to_string())?;
    let out = dp.test_run(program, input).map_err(|e| format!("{name}: {e:?}"))?;
    let after = dp.maps().counter(reason).map_err(|e| e.to_string())?;
    let mut errs = Vec::new();
    if out.action != want.action {
        errs.push(format!("action {} want {}", xdp::name(out.action), xdp::name(want.action)));
    }
    // XDP leaves its tcx companion a mark (4 bytes of metadata) on exactly the frames it
    // defers to it.
    let want_meta = if program == Program::Vip && reason == Reason::UntaggedAtXdp { 4 } else { 0 };
    if out.meta != want_meta {
        errs.push(format!("{} bytes of metadata left, want {want_meta}", out.meta));
    }
    if after != before + 1 {
        errs.push(format!("counter {} moved by {} want 1", reason.name(), after - before));
    }
    let expected = want.output.as_deref().unwrap_or(input);
    if out.frame != expected {
        errs.push(format!("output\n   got  {:02x?}\n   want {expected:02x?}", out.frame));
    }
    if errs.is_empty() {
        Ok(out.frame)
    } else {
        Err(format!("{name}: {}", errs.join("; ")))
    }
}

/// A change the agent's map layer makes, as a fast-path walk step applies it: to the
/// watched VIP, or ([`VipChange::SetOther`]) to the other one.
#[derive(Clone, Copy, Debug)]
pub enum VipChange {
    Set(VipState),
    /// A state, balancing until the deadline given (`set_vip_with_balancing`).
    SetBalancing(VipState, u64),
    Probing(bool),
    StopAnswering,
    /// Hand over, balancing until the deadline given.
    HandOver(u64),
    Remove,
    DeferFastPath,
    ResumeFastPath,
    SetOther(VipState),
}

/// What a fast-path walk step sends, and what the program must do with it, for one
/// family: the request (ARP request, Neighbor Solicitation) for the watched VIP and for
/// the other VIP, another host's probe for the watched VIP, and the expected answer,
/// follower drop, probe pass and not-a-VIP pass.
pub struct WalkFrames {
    pub request: Vec<u8>,
    pub request_other: Vec<u8>,
    pub probe: Vec<u8>,
    pub answered: Expect,
    pub dropped: Expect,
    pub probe_passed: Expect,
    pub not_vip: Expect,
}

/// The frame a walk step sends.
#[derive(Clone, Copy, Debug)]
enum Sent {
    Request,
    RequestOther,
    Probe,
}

/// What the program does with it.
#[derive(Clone, Copy, Debug)]
enum Done {
    Answered,
    Dropped,
    ProbePassed,
    NotVip,
}

/// One step of [`walk_fast_path`]: its name, its changes, the watched VIP's fast path
/// after them (`None`: not in its list), the frame sent and what the program does.
type WalkStep = (&'static str, Vec<VipChange>, Option<FastPath>, Sent, Done);

/// The walk both families' resolution fixtures run (`VipSet::ARP_SKIP` and
/// `VipSet::ARP_ANSWER`, `VipSet6::NS_SKIP` and `VipSet6::NS_ANSWER`), starting with `vip`
/// a follower: after each step's changes (through the agent's map layer), `vip`'s fast
/// path must be what the step says (`None`: not in its list), and the program must
/// handle the step's frame as it says, the clock included (a leader's bit past its
/// deadline answers nothing). `other` is a second VIP of the same family.
pub fn walk_fast_path(dp: &mut Dataplane, vip: IpAddr, other: IpAddr, frames: &WalkFrames) {
    use FastPath::{Answer, Drop, Lookup};
    use VipChange::*;
    let leader = VipState::leader_until(VipState::FOREVER);
    let steps: Vec<WalkStep> = vec![
        ("follower", vec![], Some(Drop), Sent::Request, Done::Dropped),
        ("leader", vec![Set(leader)], Some(Answer), Sent::Request, Done::Answered),
        ("leader, probing", vec![Probing(true)], Some(Answer), Sent::Request, Done::Answered),
        (
            "leader until a Lease deadline",
            vec![Set(VipState::leader_until(deadline_in(3600)))],
            Some(Answer),
            Sent::Request,
            Done::Answered,
        ),
        ("renewed", vec![Set(VipState::leader_until(deadline_in(7200)))], Some(Answer), Sent::Request, Done::Answered),
        (
            "balancing past its deadline: the hash decides",
            vec![SetBalancing(VipState::leader_until(deadline_in(3600)), VipState::FOREVER)],
            Some(Lookup),
            Sent::Request,
            Done::Answered,
        ),
        (
            "balancing on after its deadline passed: the hash decides, no answer",
            vec![SetBalancing(VipState::leader_until(1), VipState::FOREVER)],
            Some(Lookup),
            Sent::Request,
            Done::Dropped,
        ),
        (
            "leader whose deadline passed: the bit, and no answer",
            vec![Set(VipState::leader_until(1))],
            Some(Answer),
            Sent::Request,
            Done::Dropped,
        ),
        ("stopped answering", vec![Set(leader), StopAnswering], Some(Drop), Sent::Request, Done::Dropped),
        ("follower, probing", vec![Probing(true)], Some(Lookup), Sent::Probe, Done::ProbePassed),
        ("probe over", vec![Probing(false)], Some(Drop), Sent::Probe, Done::Dropped),
        (
            "led, then handed over",
            vec![Set(leader), HandOver(VipState::FOREVER)],
            Some(Drop),
            Sent::Request,
            Done::Dropped,
        ),
        ("removed while leading", vec![Set(leader), Remove], None, Sent::Request, Done::NotVip),
        (
            "adopted from an older agent: no bit while its program may still run",
            vec![DeferFastPath, Set(VipState::follower())],
            Some(Lookup),
            Sent::Request,
            Done::Dropped,
        ),
        ("this agent's program attached, following", vec![ResumeFastPath], Some(Drop), Sent::Request, Done::Dropped),
        (
            "adopted again, leading under the adopted program",
            vec![DeferFastPath, Set(leader)],
            Some(Lookup),
            Sent::Request,
            Done::Answered,
        ),
        (
            "leading under the adopted program, renewed",
            vec![Set(VipState::leader_until(deadline_in(3600)))],
            Some(Lookup),
            Sent::Request,
            Done::Answered,
        ),
        ("this agent's program attached", vec![ResumeFastPath], Some(Answer), Sent::Request, Done::Answered),
        ("a follower again", vec![StopAnswering], Some(Drop), Sent::Request, Done::Dropped),
        ("removed as a follower", vec![Remove], None, Sent::Request, Done::NotVip),
        (
            "another VIP in the freed slot, as a follower",
            vec![SetOther(VipState::follower())],
            None,
            Sent::RequestOther,
            Done::Dropped,
        ),
    ];
    for (name, changes, fast_path, sent, done) in steps {
        for change in changes {
            apply(dp, vip, other, change);
        }
        assert_eq!(dp.maps().fast_path(vip).expect("fast path"), fast_path, "{name}: fast path of {vip}");
        let input = match sent {
            Sent::Request => &frames.request,
            Sent::RequestOther => &frames.request_other,
            Sent::Probe => &frames.probe,
        };
        let want = match done {
            Done::Answered => &frames.answered,
            Done::Dropped => &frames.dropped,
            Done::ProbePassed => &frames.probe_passed,
            Done::NotVip => &frames.not_vip,
        };
        run_and_check(dp, Program::Vip, name, input, want).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(dp.maps().fast_path(other).expect("fast path"), Some(Drop), "{other}, a follower in the freed slot");
}

/// Makes `change` through the agent's map layer.
fn apply(dp: &mut Dataplane, vip: IpAddr, other: IpAddr, change: VipChange) {
    let maps = dp.maps_mut();
    let done = match change {
        VipChange::Set(state) => maps.set_vip(vip, state),
        VipChange::SetBalancing(state, until) => maps.set_vip_with_balancing(vip, state, until),
        VipChange::Probing(on) => maps.set_probing(vip, on),
        VipChange::StopAnswering => maps.stop_answering(vip),
        VipChange::HandOver(until) => maps.hand_over_vip(vip, until),
        VipChange::Remove => maps.remove_vip(vip),
        VipChange::DeferFastPath => {
            maps.defer_fast_path();
            Ok(())
        }
        VipChange::ResumeFastPath => maps.resume_fast_path(),
        VipChange::SetOther(state) => maps.set_vip(other, state),
    };
    done.unwrap_or_else(|e| panic!("{change:?}: {e}"));
}

/// A Lease deadline `secs` seconds from now (kernel boot-time ns, as the agent writes it).
pub fn deadline_in(secs: u64) -> u64 {
    vip_agent::clock::boot_ns() + secs * 1_000_000_000
}

/// The destination MAC of the frame the XDP program returns for `frame` (`BPF_PROG_RUN`),
/// run on CPU `cpu` (per-CPU maps, the flow cache among them, are that CPU's).
pub fn dst_mac_on_cpu(dp: &Dataplane, cpu: usize, frame: &[u8]) -> Vec<u8> {
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::run_on_cpu(cpu);
            dp.test_run(Program::Vip, frame).unwrap().frame[0..6].to_vec()
        })
        .join()
        .unwrap()
    })
}

/// A backend's health as a fixture sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Serving what it holds, no new flows (its VIP-path probe refused, as when its node
    /// leaves).
    Draining,
    /// Serving nothing.
    Down,
}

/// `specs` with the one at `index` in `health`.
pub fn with_health(mut specs: Vec<BackendSpec>, index: usize, health: Health) -> Vec<BackendSpec> {
    let spec = &mut specs[index];
    (spec.healthy, spec.draining, spec.reason) = match health {
        Health::Up => (true, false, vip_common::HealthReason::None),
        Health::Draining => (false, true, vip_common::HealthReason::VipPath),
        Health::Down => (false, false, vip_common::HealthReason::Connect),
    };
    specs
}

/// The holder check both families' fixtures run: a draining backend keeps the
/// connections this node never pinned. `frame(port, flags)` is a client's TCP frame to
/// the VIP from `port`; the four `ports` are flows the installed table, every backend
/// up, sends to the backend with MAC `held_mac`; `set(dp, health)` sets its health.
/// - Draining straight from down: it was in no table, so it holds nothing.
/// - Draining after up: a mid-connection packet of a flow this node never saw (its
///   connection was balanced before the drain, by another node, and the client moved
///   here) goes to the backend that holds it, from another CPU too; a
///   new flow in the same slots does not go there.
/// - Down: it holds nothing more; such a packet goes where new flows go.
pub fn check_a_draining_backend_keeps_the_connections_this_node_never_pinned(
    dp: &mut Dataplane,
    frame: impl Fn(u16, u8) -> Vec<u8>,
    ports: [u16; 4],
    held_mac: [u8; 6],
    mut set: impl FnMut(&mut Dataplane, Health),
) {
    use crate::frames::{TCP_ACK, TCP_SYN};
    assert!(std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2, "needs two CPUs");
    let held = held_mac.to_vec();
    let [starting, earlier, new, later] = ports;
    set(dp, Health::Down);
    set(dp, Health::Draining);
    assert_ne!(dst_mac_on_cpu(dp, 0, &frame(starting, TCP_ACK)), held, "a backend never in the table held a flow");
    set(dp, Health::Up);
    set(dp, Health::Draining);
    assert_eq!(dst_mac_on_cpu(dp, 0, &frame(earlier, TCP_ACK)), held, "an earlier connection left its holder");
    assert_eq!(dst_mac_on_cpu(dp, 1, &frame(earlier, TCP_ACK)), held, "another CPU sent it elsewhere");
    let moved = dst_mac_on_cpu(dp, 0, &frame(new, TCP_SYN));
    assert_ne!(moved, held, "a new flow went to a draining backend");
    assert_eq!(dst_mac_on_cpu(dp, 1, &frame(new, TCP_ACK)), moved, "a new flow did not follow its pin");
    set(dp, Health::Down);
    assert_ne!(dst_mac_on_cpu(dp, 0, &frame(later, TCP_ACK)), held, "a backend that serves nothing held a flow");
}

/// The per-CPU flow-cache check both families' fixtures run: `syn` then `ack` of one flow
/// on CPU 0 go to `pinned_mac` (and CPU 0 caches the pin); `set_down(dp, true)` takes
/// that backend down, and the flow, run on CPU 1, is re-pinned to another backend;
/// `set_down(dp, false)` brings it back, and CPU 0 follows the re-pin instead of its
/// cache (a backend's state change invalidates every CPU's cache).
pub fn check_a_cached_flow_follows_a_re_pin_made_on_another_cpu(
    dp: &mut Dataplane,
    syn: &[u8],
    ack: &[u8],
    pinned_mac: [u8; 6],
    mut set_down: impl FnMut(&mut Dataplane, bool),
) {
    assert!(std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2, "needs two CPUs");
    assert_eq!(dst_mac_on_cpu(dp, 0, syn), pinned_mac.to_vec());
    assert_eq!(dst_mac_on_cpu(dp, 0, ack), pinned_mac.to_vec(), "cached on CPU 0");
    set_down(dp, true);
    let moved = dst_mac_on_cpu(dp, 1, ack);
    assert_ne!(moved, pinned_mac.to_vec(), "re-pinned away from the down backend");
    set_down(dp, false);
    assert_eq!(dst_mac_on_cpu(dp, 0, ack), moved, "CPU 0's cache sent the flow back to its old backend");
}

/// The check both families' forwarding fixtures run for a reused flow: `syn` is pinned to
/// backend `pinned_mac` on CPU 0 and its `ack` follows; `set(dp, Health::Draining)` makes
/// that backend drain (serving what it holds, no new flows), and the `ack` still goes there,
/// from CPU 0 and CPU 1 (both now cache the pin). The same `syn` again on CPU 0 (a client
/// reusing the addresses and ports of that old flow) is balanced afresh to another
/// backend, and the `ack` follows the new pin on both CPUs, not a cached old one. With
/// the backend up again (`set(dp, Health::Up)`), a reused SYN keeps its pin.
pub fn check_a_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh(
    dp: &mut Dataplane,
    syn: &[u8],
    ack: &[u8],
    pinned_mac: [u8; 6],
    mut set: impl FnMut(&mut Dataplane, Health),
) {
    assert!(std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2, "needs two CPUs");
    let pinned = pinned_mac.to_vec();
    assert_eq!(dst_mac_on_cpu(dp, 0, syn), pinned, "pinned");
    assert_eq!(dst_mac_on_cpu(dp, 0, ack), pinned, "the flow follows its pin");
    set(dp, Health::Draining);
    assert_eq!(dst_mac_on_cpu(dp, 0, ack), pinned, "a draining backend keeps its flows");
    assert_eq!(dst_mac_on_cpu(dp, 1, ack), pinned, "a draining backend keeps its flows, on another CPU too");
    let moved = dst_mac_on_cpu(dp, 0, syn);
    assert_ne!(moved, pinned, "a reused SYN followed the old pin to the draining backend");
    assert_eq!(dst_mac_on_cpu(dp, 0, ack), moved, "the next packet did not follow the new pin");
    assert_eq!(dst_mac_on_cpu(dp, 1, ack), moved, "another CPU's cache sent the new connection to the old backend");
    set(dp, Health::Up);
    assert_eq!(dst_mac_on_cpu(dp, 0, syn), moved, "a reused SYN to a backend that takes new flows keeps its pin");
}
