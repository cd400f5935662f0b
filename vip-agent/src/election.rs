//! Leader election over a `coordination.k8s.io/v1` Lease, by client-go's rules, with
//! fencing in the data plane.
//!
//! - Expiry is judged by the *local* monotonic time at which a change of the Lease was
//!   observed (a new `resourceVersion`), never by comparing the holder's clock with ours.
//! - Acquire and renew are `PUT`s carrying `metadata.resourceVersion`: losing a race is a
//!   409, never a silent overwrite. Creating a missing Lease is a `POST` (409 if another
//!   node created it first).
//! - Every request is bounded in time, and kube's client does not retry, so a hung API
//!   call cannot keep a stale leader answering.
//! - Fencing: a successful renew that *started* at `t` makes this node leader until
//!   `t + renew_deadline` in the XDP map, written by the election itself through a
//!   [`Fence`] (so stepping down always happens before a release). Another node can
//!   acquire only `lease_duration` after it observed that renew, which happened after
//!   `t`; since `renew_deadline < lease_duration`, a crashed, hung or partitioned leader
//!   stops answering ARP before anyone else can start.
//! - Whatever happens to the Lease object (deleted and recreated, holder rewritten or
//!   cleared by hand), a node starts answering only when every earlier holder's fence has
//!   surely passed: at once only after an observed expiry, a clean release (the releaser
//!   stopped answering first and said so), or its own renewal; after any other
//!   acquisition it waits out a lease duration first.
//! - Identity: the holder is the node name, and the holder's process is named by an
//!   instance id in the annotation [`ANNOTATION_INSTANCE`]. Two processes under one name
//!   (a cloned VM that kept its hostname) are told apart and never both lead; each logs
//!   the duplicate. A restarted agent on the same node, which knows its predecessor's
//!   instance from the pinned data plane, takes its own Lease over at once.
//! - Graceful stop, or this node turning ineligible (apiserver unready, link down, a
//!   foreign MAC answering for the VIP), steps down and releases the Lease (holder
//!   cleared, [`ANNOTATION_RELEASED`] set): a follower takes over at its next try instead
//!   of waiting for expiry.
//!
//! kube-lease-manager 0.13 is not used: it compares the holder's clock with the local
//! one, steals and renews without preconditions, has no fencing and whole-second timers.

use std::{collections::BTreeMap, future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::api::{Api, PostParams};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, error, info, warn};

/// The instance id of the process holding the Lease (beside `holderIdentity`, which is
/// the node name).
pub const ANNOTATION_INSTANCE: &str = "vip.dev/holder-instance";
/// Set by a clean release to the releasing instance: it stopped answering before it
/// released, so the next holder need not wait for its fence.
pub const ANNOTATION_RELEASED: &str = "vip.dev/released-by";
/// Written by a process that found another process renewing the Lease under its own
/// node name: `<its instance> <count>`. The holder reads it as "a duplicate is alive".
pub const ANNOTATION_DUPLICATE: &str = "vip.dev/duplicate-instance";
/// The VIPs the holder serves ([`ElectionConfig::vips`]), written with every claim. One
/// Lease elects the leader of every VIP, so a VIP the followers carry and the leader does
/// not (a rolling change of the VIP list, a typo on one node) goes unanswered cluster-wide:
/// followers compare, and say so ([`ElectionEvent::LeaderDiffers`]).
pub const ANNOTATION_VIPS: &str = "vip.dev/vips";
/// The holder's flow placement ([`ElectionConfig::flow_placement`]), written with every
/// claim. Every node must place a flow on the same backend (the same flow-hash seed and
/// Maglev table size): a node that places flows otherwise resets the connections it is
/// handed at a failover, and nothing in the data path can tell. Followers compare, and
/// say so ([`ElectionEvent::LeaderDiffers`]).
pub const ANNOTATION_FLOW_PLACEMENT: &str = "vip.dev/flow-placement";
/// How often a duplicate re-announces itself in [`ANNOTATION_DUPLICATE`].
pub const DUPLICATE_REFRESH: Duration = Duration::from_secs(5);

/// Election timing and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub lease_name: String,
    pub lease_namespace: String,
    /// The node name: `holderIdentity`.
    pub identity: String,
    /// This process's instance id (random per start).
    pub instance: String,
    /// The instance of the agent that ran on this node before (from the pinned data
    /// plane), whose Lease this one may take over at once. `Some("")`: an agent that
    /// predates instance ids.
    pub predecessor: Option<String>,
    /// How long a Lease stays valid after a change was observed. Written to the Lease
    /// rounded up to whole seconds (the API's unit); kept in milliseconds inside.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading (and its XDP deadline
    /// has already passed). Less than `lease_duration`.
    pub renew_deadline: Duration,
    /// Time between two tries, for leader and followers alike.
    pub retry_period: Duration,
    /// Bootstrap (`kubeadm init`): until the Lease API first answers this process, hold
    /// the VIP without a Lease if no other host answers for it (see [`run`]).
    pub bootstrap: bool,
    /// This node's VIPs, sorted and comma-separated ([`ANNOTATION_VIPS`]).
    pub vips: String,
    /// How this node places flows on backends ([`ANNOTATION_FLOW_PLACEMENT`]; see
    /// `maglev::placement`).
    pub flow_placement: String,
}

/// What a follower compares between its own configuration and the Lease holder's,
/// written by the holder with every claim. One Lease elects the leader of every VIP, so
/// the leader's configuration is what the clients get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compared {
    /// The VIPs ([`ANNOTATION_VIPS`]): a VIP the leader lacks goes unanswered everywhere.
    Vips,
    /// The flow placement ([`ANNOTATION_FLOW_PLACEMENT`]): connections the leader
    /// balanced are reset when a node that places flows otherwise takes over.
    FlowPlacement,
}

impl Compared {
    pub const ALL: [Compared; 2] = [Compared::Vips, Compared::FlowPlacement];

    /// The annotation the holder writes it in.
    pub fn annotation(self) -> &'static str {
        match self {
            Compared::Vips => ANNOTATION_VIPS,
            Compared::FlowPlacement => ANNOTATION_FLOW_PLACEMENT,
        }
    }

    /// Its position in [`Compared::ALL`], for arrays kept per value.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl ElectionConfig {
    /// This node's value of `what`, as the holder writes it.
    pub fn ours(&self, what: Compared) -> &str {
        match what {
            Compared::Vips => &self.vips,
            Compared::FlowPlacement => &self.flow_placement,
        }
    }

    /// `leaseDurationSeconds` as written to the Lease.
    pub fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX)
    }
}

/// An instance id as the Lease annotation and `/status` write it: its 8 bytes in hex
/// (16 digits).
pub fn instance_hex(id: &[u8; 8]) -> String {
    id.iter().map(|x| format!("{x:02x}")).collect()
}

/// `N` random bytes from the kernel (`getrandom(2)`); if it fails (never seen on
/// Linux ≥ 3.17 for so few bytes), the clock and the pid, which still make two processes
/// differ.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: getrandom fills at most b.len() bytes of b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mix = (t ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = mix[i % 8];
        }
    }
    b
}

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("Lease API request timed out after {0:?}")]
    Timeout(Duration),
    #[error("Lease API: {0}")]
    Api(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("Lease API answered {code}: {message}")]
    Status { code: u16, message: String },
}

/// What the elector needs from the API server. The real one is [`KubeLeases`]; tests use
/// an in-memory one with the same resourceVersion semantics.
pub trait LeaseApi {
    /// The Lease, or `None` if it does not exist (404).
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, ElectionError>> + Send;
    /// Creates it; `Ok(None)` if it already exists (409).
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Option<Lease>, ElectionError>> + Send;
    /// Replaces it, conditional on `metadata.resourceVersion`; `Ok(None)` on a conflict.
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Option<Lease>, ElectionError>> + Send;
}

/// The Lease through kube's client. A call refused with 401 builds the client again
/// from its source (see [`crate::apiclient::Rebuilds`]), so a renewed kubeconfig is taken
/// without a restart.
pub struct KubeLeases {
    api: std::sync::Mutex<Api<Lease>>,
    namespace: String,
    name: String,
    rebuilds: crate::apiclient::Rebuilds,
}

impl KubeLeases {
    /// `source`: where `client` came from, to build it again after a 401.
    pub fn new(client: kube::Client, namespace: &str, name: &str, source: crate::apiclient::ClientSource) -> Self {
        Self {
            api: std::sync::Mutex::new(Api::namespaced(client, namespace)),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            rebuilds: crate::apiclient::Rebuilds::new(source),
        }
    }

    fn api(&self) -> Api<Lease> {
        // A poisoned lock still holds a usable Api: it is only ever replaced whole.
        self.api.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `e`, after building the client again if it is a 401.
    async fn failed(&self, e: kube::Error) -> ElectionError {
        if is_code(&e, 401) {
            if let Some(client) = self.rebuilds.after_unauthorized("the Lease API").await {
                *self.api.lock().unwrap_or_else(|p| p.into_inner()) = Api::namespaced(client, &self.namespace);
            }
        }
        api_err(e)
    }
}

fn api_err(e: kube::Error) -> ElectionError {
    match e {
        kube::Error::Api(s) => ElectionError::Status { code: s.code, message: s.message },
        other => ElectionError::Api(Box::new(other)),
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl LeaseApi for KubeLeases {
    async fn get(&self) -> Result<Option<Lease>, ElectionError> {
        match self.api().get(&self.name).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if is_code(&e, 404) => Ok(None),
            Err(e) => Err(self.failed(e).await),
        }
    }

    async fn create(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
        match self.api().create(&PostParams::default(), lease).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if is_code(&e, 409) => Ok(None),
            Err(e) => Err(self.failed(e).await),
        }
    }

    async fn replace(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
        match self.api().replace(&self.name, &PostParams::default(), lease).await {
            Ok(l) => Ok(Some(l)),
            // 404: deleted under us; the next try creates it.
            Err(e) if is_code(&e, 409) || is_code(&e, 404) => Ok(None),
            Err(e) => Err(self.failed(e).await),
        }
    }
}

/// What one try to acquire or renew found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Try {
    /// This node holds the Lease as of the moment the try started. `fenced_until`: an
    /// earlier holder's fence may still run until then (the Lease was created afresh, or
    /// taken without an observed expiry or a clean release): do not answer before.
    Held { fenced_until: Option<Instant> },
    /// Another node (or another process under this name) holds it.
    Following,
}

/// client-go's tryAcquireOrRenew, on an observed state, with instance ids and fences.
pub struct Elector<A> {
    api: A,
    cfg: ElectionConfig,
    /// resourceVersion last seen, and the local time it was first seen.
    observed: Option<(String, Instant)>,
    /// The Lease as last seen (for release).
    last: Option<Lease>,
    /// The longest lease duration seen written: how long an unknown earlier holder's
    /// fence can last.
    longest_duration: Duration,
    /// Another process renewing under our name: its instance and the resourceVersions
    /// at which it was seen holding.
    duplicate: Option<(String, Vec<String>)>,
    /// The duplicate announcement last written (ours) or read (the holder's view), and
    /// when.
    duplicate_written: Option<(u64, Instant)>,
    duplicate_seen: Option<String>,
    /// When the last write that made this process the holder started: the fence counts
    /// from there, not from the try's read (see [`Elector::written_at`]).
    written_at: Option<Instant>,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty())
}

fn annotation<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

fn set_annotation(lease: &mut Lease, key: &str, value: Option<String>) {
    let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    match value {
        Some(v) => {
            annotations.insert(key.to_owned(), v);
        }
        None => {
            annotations.remove(key);
        }
    }
}

fn lease_duration_of(lease: &Lease) -> Duration {
    Duration::from_secs(lease.spec.as_ref().and_then(|s| s.lease_duration_seconds).unwrap_or(0).max(0) as u64)
}

/// Whose the Lease is, from this process's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// This process.
    Me,
    /// The agent that ran on this node before this one (sequential restart).
    Predecessor,
    /// Another process under this node's name: a duplicate identity.
    Duplicate,
    /// Another node.
    Other,
    /// Nobody, after a clean release.
    Released,
    /// Nobody, without a clean release (holder cleared by hand, or a fresh Lease).
    Vacant,
}

impl<A: LeaseApi> Elector<A> {
    pub fn new(api: A, cfg: ElectionConfig) -> Self {
        let longest_duration = cfg.lease_duration;
        Self {
            api,
            cfg,
            observed: None,
            last: None,
            longest_duration,
            duplicate: None,
            duplicate_written: None,
            duplicate_seen: None,
            written_at: None,
        }
    }

    /// When the last successful write of this process (create, acquire or renewal)
    /// started. The renewTime it wrote is no earlier, and every other node counts the
    /// Lease's duration from when it saw that write, so a fence of the renew deadline
    /// from here ends before any other node may take over. Counted from the try's start
    /// instead, an acquisition through a slow API (a read and a write, then the claim
    /// probe) left the first renewal too little time: at 200 ms per call every new
    /// leader stepped down within 80 ms, and nobody held the VIP for as long as the
    /// slowness lasted (a chaos trial).
    pub fn written_at(&self) -> Option<Instant> {
        self.written_at
    }

    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    /// The holder as last observed.
    pub fn observed_holder(&self) -> Option<&str> {
        self.last.as_ref().and_then(holder_of)
    }

    /// The holder, and its value of `what`, when another node holds the Lease and its
    /// value is not this node's (an agent from before the annotation writes none: not
    /// compared).
    pub fn leader_differs(&self, what: Compared) -> Option<(String, String)> {
        let lease = self.last.as_ref()?;
        let holder = holder_of(lease).filter(|h| *h != self.cfg.identity)?;
        let theirs = annotation(lease, what.annotation()).filter(|v| *v != self.cfg.ours(what))?;
        Some((holder.to_owned(), theirs.to_owned()))
    }

    /// Another process seen renewing the Lease under this node's name (its instance),
    /// or announcing itself in [`ANNOTATION_DUPLICATE`] while this one holds it.
    pub fn duplicate(&self) -> Option<&str> {
        self.duplicate
            .as_ref()
            .filter(|(_, rvs)| rvs.len() >= 2)
            .map(|(i, _)| i.as_str())
            .or(self.duplicate_seen.as_deref())
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().map(|(r, _)| r) != Some(&rv) {
            self.observed = Some((rv, now));
        }
        self.longest_duration = self.longest_duration.max(lease_duration_of(lease));
        self.last = Some(lease.clone());
    }

    fn owner(&self, lease: &Lease) -> Owner {
        let instance = annotation(lease, ANNOTATION_INSTANCE);
        match holder_of(lease) {
            Some(h) if h == self.cfg.identity => {
                if instance == Some(self.cfg.instance.as_str()) {
                    Owner::Me
                } else if self.cfg.predecessor.as_deref().is_some_and(|p| instance.unwrap_or("") == p) {
                    Owner::Predecessor
                } else {
                    Owner::Duplicate
                }
            }
            Some(_) => Owner::Other,
            None => {
                let released = annotation(lease, ANNOTATION_RELEASED);
                if released.is_some() && released == instance {
                    Owner::Released
                } else {
                    Owner::Vacant
                }
            }
        }
    }

    /// The Lease this process writes when it takes `base` (or creates one).
    fn claimed(&self, base: Option<&Lease>) -> Lease {
        let mut lease = base.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.cfg.lease_name.clone()),
                namespace: Some(self.cfg.lease_namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec { lease_transitions: Some(0), ..Default::default() }),
        });
        let old = lease.spec.clone().unwrap_or_default();
        let mut spec = old.clone();
        let continuing = base.is_some_and(|b| matches!(self.owner(b), Owner::Me | Owner::Predecessor));
        spec.holder_identity = Some(self.cfg.identity.clone());
        spec.lease_duration_seconds = Some(self.cfg.lease_seconds());
        spec.renew_time = Some(now_micro());
        if !continuing {
            spec.acquire_time = Some(now_micro());
            // client-go counts every acquisition of an existing Lease by a process that
            // did not lead, a released one included (a hand-over is a transition).
            if base.is_some() {
                // Wrapped to 0 rather than past i32::MAX: the API refuses a negative count.
                spec.lease_transitions = Some(old.lease_transitions.unwrap_or(0).checked_add(1).unwrap_or(0));
            }
            set_annotation(&mut lease, ANNOTATION_DUPLICATE, None);
        }
        set_annotation(&mut lease, ANNOTATION_INSTANCE, Some(self.cfg.instance.clone()));
        set_annotation(&mut lease, ANNOTATION_RELEASED, None);
        for what in Compared::ALL {
            set_annotation(&mut lease, what.annotation(), Some(self.cfg.ours(what).to_owned()));
        }
        lease.spec = Some(spec);
        lease
    }

    /// One try to acquire or renew.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Try, ElectionError> {
        if let Some(renewed) = self.renew_optimistically().await {
            return Ok(renewed);
        }
        let Some(current) = self.api.get().await? else {
            // Created afresh: whoever held a Lease that was deleted may still be inside
            // its fence.
            let writing = Instant::now();
            return Ok(match self.api.create(&self.claimed(None)).await? {
                Some(created) => {
                    self.written_at = Some(writing);
                    self.observe(&created, Instant::now());
                    Try::Held { fenced_until: Some(Instant::now() + self.longest_duration) }
                }
                None => Try::Following,
            });
        };
        let now = Instant::now();
        self.observe(&current, now);
        let owner = self.owner(&current);
        let observed_at = self.observed.as_ref().map_or(now, |(_, t)| *t);
        let expired = observed_at + lease_duration_of(&current) <= now;
        if owner == Owner::Duplicate {
            self.note_duplicate(&current).await;
        }
        if owner == Owner::Me {
            self.note_duplicate_announcement(&current);
        }
        let fenced_until = match owner {
            Owner::Me | Owner::Predecessor | Owner::Released => None,
            Owner::Other | Owner::Duplicate if !expired => {
                debug!(holder = ?holder_of(&current), "Lease held by another process and not expired");
                return Ok(Try::Following);
            }
            Owner::Other | Owner::Duplicate => None,
            Owner::Vacant if expired => None,
            Owner::Vacant => Some(Instant::now() + self.longest_duration),
        };
        let writing = Instant::now();
        match self.api.replace(&self.claimed(Some(&current))).await? {
            Some(updated) => {
                self.written_at = Some(writing);
                if owner == Owner::Predecessor {
                    info!(identity = %self.cfg.identity, "took over the Lease of the previous agent on this node");
                }
                self.observe(&updated, Instant::now());
                // Another window for the fence to pass, counted from now.
                Ok(Try::Held { fenced_until: fenced_until.map(|_| Instant::now() + self.longest_duration) })
            }
            None => Ok(Try::Following),
        }
    }

    /// Reads the Lease and observes it, writing nothing: what a node that cannot carry
    /// the VIP does each retry period, so that what it reports (the API answering, the
    /// holder's VIPs) stays true, and its view of the holder's renewals is current when
    /// it can carry the VIP again (an expiry it watched needs no fresh wait).
    pub async fn observe_only(&mut self) -> Result<(), ElectionError> {
        if let Some(current) = self.api.get().await? {
            self.observe(&current, Instant::now());
        }
        Ok(())
    }

    /// The holder's renewal written over the Lease as this process last wrote it, without
    /// reading it first: one request where a read and a write take two, so a leader
    /// tolerates twice the API latency within its renew deadline. client-go's fast path
    /// (`tryAcquireOrRenew`, "update optimistically", since 1.30): taken while this process
    /// holds the Lease by its last observation and that observation has not expired.
    /// `None`: not taken, or the write failed (a conflict: someone else wrote the Lease,
    /// a duplicate's announcement or a hand edit among them; or no answer), and the try
    /// goes on with the read, as client-go's does.
    async fn renew_optimistically(&mut self) -> Option<Try> {
        let last = self.last.as_ref()?;
        let (_, observed_at) = self.observed.as_ref()?;
        if self.owner(last) != Owner::Me || *observed_at + lease_duration_of(last) <= Instant::now() {
            return None;
        }
        let writing = Instant::now();
        match self.api.replace(&self.claimed(Some(last))).await {
            Ok(Some(updated)) => {
                self.written_at = Some(writing);
                self.observe(&updated, Instant::now());
                Some(Try::Held { fenced_until: None })
            }
            Ok(None) => {
                debug!("the Lease changed since this node renewed it: reading it");
                None
            }
            Err(e) => {
                debug!(error = %error_chain(&e), "renewing the Lease failed: reading it");
                None
            }
        }
    }

    /// Another process holds the Lease under our name. Two renewals seen (two
    /// resourceVersions) make it a live duplicate, not a one-off edit: log it and let
    /// the holder know through the Lease (a conditional write, every
    /// [`DUPLICATE_REFRESH`]).
    async fn note_duplicate(&mut self, lease: &Lease) {
        let instance = annotation(lease, ANNOTATION_INSTANCE).unwrap_or("").to_owned();
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let entry = self.duplicate.get_or_insert_with(|| (instance.clone(), Vec::new()));
        if entry.0 != instance {
            *entry = (instance.clone(), Vec::new());
        }
        if !entry.1.contains(&rv) {
            entry.1.push(rv);
            if entry.1.len() == 2 {
                error!(
                    identity = %self.cfg.identity, other_instance = %instance, instance = %self.cfg.instance,
                    "another vip-agent runs under this node name (a cloned host?): it leads, this one will not \
                     while it renews; give each node a unique --node-name"
                );
            }
        }
        if entry.1.len() < 2 {
            return;
        }
        let due = self.duplicate_written.is_none_or(|(_, at)| at.elapsed() >= DUPLICATE_REFRESH);
        if !due {
            return;
        }
        let count = self.duplicate_written.map_or(1, |(n, _)| n + 1);
        let mut next = lease.clone();
        set_annotation(&mut next, ANNOTATION_DUPLICATE, Some(format!("{} {count}", self.cfg.instance)));
        if let Ok(Some(updated)) = self.api.replace(&next).await {
            self.duplicate_written = Some((count, Instant::now()));
            self.observe(&updated, Instant::now());
        }
    }

    /// The holder's side: a duplicate announced itself in the Lease.
    fn note_duplicate_announcement(&mut self, lease: &Lease) {
        let Some(value) = annotation(lease, ANNOTATION_DUPLICATE) else { return };
        let other = value.split_whitespace().next().unwrap_or("").to_owned();
        if other == self.cfg.instance || self.duplicate_seen.as_deref() == Some(value) {
            return;
        }
        if self.duplicate_seen.is_none() {
            error!(
                identity = %self.cfg.identity, other_instance = %other, instance = %self.cfg.instance,
                "another vip-agent runs under this node name (a cloned host?); give each node a unique --node-name"
            );
        }
        self.duplicate_seen = Some(value.to_owned());
    }

    /// Gives the Lease up if this process holds it: holder cleared, duration 1 s (as
    /// client-go's ReleaseOnCancel does), [`ANNOTATION_RELEASED`] set to this instance.
    /// Conditional on the resourceVersion. The caller must have stopped answering.
    pub async fn release(&mut self) -> Result<bool, ElectionError> {
        let Some(current) = self.api.get().await? else { return Ok(false) };
        if !matches!(self.owner(&current), Owner::Me | Owner::Predecessor) {
            return Ok(false);
        }
        let mut next = current.clone();
        let mut spec = current.spec.clone().unwrap_or_default();
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        next.spec = Some(spec);
        set_annotation(&mut next, ANNOTATION_INSTANCE, Some(self.cfg.instance.clone()));
        set_annotation(&mut next, ANNOTATION_RELEASED, Some(self.cfg.instance.clone()));
        let released = self.api.replace(&next).await?;
        if let Some(released) = &released {
            self.observe(released, Instant::now());
        }
        Ok(released.is_some())
    }
}

/// How the election holds the data plane to its word. Called synchronously from the
/// election task, so a step-down is in the kernel before the release is sent.
pub trait Fence {
    /// Answer ARP (and balance new flows) until `until`, and no longer.
    fn lead_until(&mut self, until: Instant);
    /// Stop answering at once.
    fn step_down(&mut self);
    /// Before claiming the VIP: check nobody else answers for it (RFC 5227 probe).
    /// `Err(mac)`: a foreign host at `mac` does.
    fn claim(&mut self) -> impl Future<Output = Result<(), ClaimConflict>> + Send;
}

/// Why a claim was refused: another host at `mac` answers for the VIP, or (with
/// `simultaneous`) probes for it at the same moment (RFC 5227 §2.1.1), which calls for a
/// short random wait rather than the hold-off of an address in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimConflict {
    pub mac: [u8; 6],
    pub simultaneous: bool,
}

/// What the election tells the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElectionEvent {
    /// This node leads (the fence already answers): announce the VIP. `bootstrap`: it
    /// holds the VIP without a Lease ([`ElectionConfig::bootstrap`], the API not
    /// answering yet), so nothing but its ARP probe backs the claim and it yields to
    /// another host claiming the VIP. Sent again with `bootstrap: false` when the Lease
    /// takes over a bootstrap hold.
    Leading { bootstrap: bool },
    /// This node stopped leading (lost, stepped down, or never had it).
    Following,
    /// The claim probe found a foreign host answering for the VIP at this MAC; the
    /// Lease was released.
    ClaimRefused { mac: [u8; 6], simultaneous: bool },
    /// Another process runs under this node's name.
    DuplicateIdentity { other_instance: String },
    /// Another node leads with another value of `what` than this node's (`theirs`), or,
    /// `None`, with the same again: sent on each change. See [`Compared`].
    LeaderDiffers { what: Compared, holder: String, theirs: Option<String> },
    /// The Lease's holder (`holderIdentity`) as this node last read it, on each change
    /// (`None`: held by none): what `status` names as the leader on a follower.
    Holder { holder: Option<String> },
    /// The Lease API started or stopped answering this node's tries (sent on each
    /// change, at the first try, and while it does not answer, when its error changes,
    /// at most once per [`API_ERROR_REPORT_EVERY`]): what `status` and
    /// `vip_lease_api_answering` show, so an outage is seen without reading the log.
    /// `error`: the latest failure.
    LeaseApi { answering: bool, error: Option<String> },
}

/// The state of one election run.
struct Run<A, F> {
    elector: Elector<A>,
    fence: F,
    cfg: ElectionConfig,
    tx: mpsc::Sender<ElectionEvent>,
    leading: bool,
    last_renew: Instant,
    /// An earlier holder's fence may run until then: claim no earlier.
    safe_from: Instant,
    duplicate_reported: Option<String>,
    /// Still bootstrapping: the Lease API has not answered this process yet.
    bootstrapping: bool,
    /// When a failed Lease call was last logged at warn level: at most one line per
    /// [`UNANSWERED_LOG_EVERY`] while the API does not answer.
    unanswered_logged: Option<Instant>,
    /// A warning of an unanswering API was logged since it last answered: its answer
    /// again is logged too.
    unanswered_warned: bool,
    /// The leader and its differing values, as last reported, by [`Compared::index`]
    /// ([`ElectionEvent::LeaderDiffers`]).
    differences_reported: [Option<(String, String)>; Compared::ALL.len()],
    /// The holder as last reported ([`ElectionEvent::Holder`]); `None` before the first.
    holder_reported: Option<Option<String>>,
    /// Whether the last try was answered, as last reported ([`ElectionEvent::LeaseApi`]),
    /// the error then and when; `None` before the first.
    api_reported: Option<(bool, Option<String>, Instant)>,
}

/// How often a changed error of a Lease API that still does not answer is reported: an
/// outage's cause can change (refused, then 403 once it is up without RBAC, then a
/// certificate error), and status showed the first one for its whole length.
const API_ERROR_REPORT_EVERY: Duration = Duration::from_secs(1);

/// `e` with its causes (`outer: cause: root`), each named once. kube's errors name only
/// their outermost layer ("client error (Connect)"), which reads the same for a refused
/// connection and for a certificate the agent does not trust; the cause is deeper.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        cause = c.source();
    }
    text
}

/// How often an unanswering Lease API is logged (each try is logged at debug).
const UNANSWERED_LOG_EVERY: Duration = Duration::from_secs(30);

impl<A: LeaseApi, F: Fence> Run<A, F> {
    async fn send(&self, event: ElectionEvent) {
        let _ = self.tx.send(event).await;
    }

    async fn step_down(&mut self, why: &str) {
        if self.leading {
            self.fence.step_down();
            self.leading = false;
            warn!(why, "stepped down");
            self.send(ElectionEvent::Following).await;
        }
    }

    async fn release(&mut self) {
        if self.bootstrapping {
            // A bootstrap hold never had the Lease (the API has not answered yet).
            debug!("bootstrap hold: no Lease to release");
            return;
        }
        match tokio::time::timeout(self.cfg.renew_deadline, self.elector.release()).await {
            Ok(Ok(true)) => info!("released the Lease"),
            Ok(Ok(false)) => debug!("Lease not held: nothing to release"),
            Ok(Err(e)) => warn!(error = %e, "releasing the Lease failed (it will expire)"),
            Err(_) => warn!("releasing the Lease timed out (it will expire)"),
        }
    }

    /// Reports whether the Lease API answered, when that changed, and a new error while
    /// it does not (see [`ElectionEvent::LeaseApi`]).
    async fn report_api(&mut self, answering: bool, error: Option<String>) {
        let flipped = self.api_reported.as_ref().is_none_or(|(a, ..)| *a != answering);
        let new_error =
            self.api_reported.as_ref().is_some_and(|(_, e, at)| *e != error && at.elapsed() >= API_ERROR_REPORT_EVERY);
        if !flipped && !new_error {
            return;
        }
        if flipped && answering && self.unanswered_warned {
            info!("the Lease API answers again");
            self.unanswered_warned = false;
        }
        self.api_reported = Some((answering, error.clone(), Instant::now()));
        self.send(ElectionEvent::LeaseApi { answering, error }).await;
    }

    /// Logs a failed Lease call: at debug each time, at warn once per
    /// [`UNANSWERED_LOG_EVERY`] (an API that is down, as during `kubeadm init`, would
    /// otherwise fill the log five times a second). The period holds across answers in
    /// between: an API that answers now and then (slow, at the edge of the budget) was
    /// warned of every few seconds.
    fn log_unanswered(&mut self, error: &str) {
        debug!(error, "Lease try failed");
        if self.unanswered_logged.is_none_or(|t| t.elapsed() >= UNANSWERED_LOG_EVERY) {
            warn!(error, every = ?UNANSWERED_LOG_EVERY, "the Lease API does not answer (logged again while it lasts)");
            self.unanswered_logged = Some(Instant::now());
            self.unanswered_warned = true;
        }
    }

    /// One try, while eligible.
    async fn try_once(&mut self) {
        let start = Instant::now();
        if self.bootstrapping && self.leading {
            // The bootstrap holder's fence runs a renew deadline from each try, as a
            // leader's does from each renewal: a hung agent stops answering by itself.
            self.last_renew = start;
            self.fence.lead_until(start + self.cfg.renew_deadline);
        }
        // A leader's try may use what is left of its renew deadline; a follower's, a
        // whole renew deadline: its read, and the write that acquires (one retry period,
        // as before, made a follower give up on an API a leader still renews through).
        let budget = if self.leading {
            (self.last_renew + self.cfg.renew_deadline).saturating_duration_since(start)
        } else {
            self.cfg.renew_deadline
        }
        .max(Duration::from_millis(50));
        let answered = match tokio::time::timeout(budget, self.elector.try_acquire_or_renew()).await {
            Ok(Ok(t)) => {
                self.report_api(true, None).await;
                Some(t)
            }
            Ok(Err(e)) => {
                let error = error_chain(&e);
                self.log_unanswered(&error);
                self.report_api(false, Some(error)).await;
                None
            }
            Err(_) => {
                let error = format!("no answer within {budget:?}");
                self.log_unanswered(&error);
                self.report_api(false, Some(error)).await;
                None
            }
        };
        let outcome = match (answered, self.bootstrapping) {
            (None, true) => return self.bootstrap_hold().await,
            (Some(t), true) => self.end_bootstrap(t).await,
            (Some(t), false) => t,
            (None, false) => Try::Following,
        };
        self.report_duplicate().await;
        self.report_leader_differences().await;
        self.report_holder().await;
        match outcome {
            Try::Held { fenced_until } => {
                let from = self.elector.written_at().map_or(start, |w| w.max(start));
                self.on_held(from, fenced_until).await
            }
            Try::Following if self.leading && Instant::now() >= self.last_renew + self.cfg.renew_deadline => {
                self.step_down("could not renew the Lease in time").await;
            }
            Try::Following => debug!(holder = ?self.elector.observed_holder(), "following"),
        }
    }

    /// Bootstrap, while the Lease API does not answer (not up yet, or RBAC not there yet
    /// during `kubeadm init`): hold the VIP if no other host answers for it. Safe without
    /// a Lease because every claim — a bootstrapping node's and an elected one's — first
    /// probes ARP and refuses a VIP another host answers for, and two nodes probing at
    /// once see each other's probes and both back off.
    async fn bootstrap_hold(&mut self) {
        if self.leading {
            return;
        }
        match self.fence.claim().await {
            Ok(()) => {
                let now = Instant::now();
                self.leading = true;
                self.last_renew = now;
                self.fence.lead_until(now + self.cfg.renew_deadline);
                warn!("bootstrap: the Lease API does not answer yet and nobody answers for the VIP: holding it");
                self.send(ElectionEvent::Leading { bootstrap: true }).await;
            }
            Err(c) => self.send(ElectionEvent::ClaimRefused { mac: c.mac, simultaneous: c.simultaneous }).await,
        }
    }

    /// The Lease API answered for the first time: from now on only the Lease decides. A
    /// bootstrap holder that created the Lease, or took a free one, keeps answering: it
    /// was the only answerer (its probe and everyone else's say so), so there is no
    /// earlier fence to wait out. Anyone else holding it means stepping down at once.
    async fn end_bootstrap(&mut self, t: Try) -> Try {
        self.bootstrapping = false;
        info!("the Lease API answers: bootstrap over, the Lease decides from now on");
        match t {
            Try::Held { .. } if self.leading => {
                self.send(ElectionEvent::Leading { bootstrap: false }).await;
                Try::Held { fenced_until: None }
            }
            Try::Following if self.leading => {
                self.step_down("bootstrap over and another node holds the Lease").await;
                Try::Following
            }
            other => other,
        }
    }

    async fn on_held(&mut self, start: Instant, fenced_until: Option<Instant>) {
        self.last_renew = start;
        if let Some(t) = fenced_until {
            // Someone may still be inside a fence this node cannot see: stop answering
            // and wait it out, renewing meanwhile.
            self.step_down("the Lease was recreated or rewritten; waiting out earlier fences").await;
            self.safe_from = self.safe_from.max(t);
            info!(wait = ?t.saturating_duration_since(Instant::now()), "holding the Lease; answering once earlier fences have passed");
        }
        if !self.leading {
            if Instant::now() < self.safe_from {
                return;
            }
            if let Err(ClaimConflict { mac, simultaneous }) = self.fence.claim().await {
                warn!(mac = %crate::netdev::MacAddr(mac), "another host answers for the VIP: not claiming it");
                self.release().await;
                self.send(ElectionEvent::ClaimRefused { mac, simultaneous }).await;
                return;
            }
            self.leading = true;
            info!(identity = %self.cfg.identity, instance = %self.cfg.instance, "acquired the Lease: leading");
            self.fence.lead_until(start + self.cfg.renew_deadline);
            self.send(ElectionEvent::Leading { bootstrap: false }).await;
            return;
        }
        self.fence.lead_until(start + self.cfg.renew_deadline);
    }

    /// Reports each [`Compared`] value on which the holder differs from this node, or
    /// agrees again, if that changed since the last report.
    async fn report_leader_differences(&mut self) {
        for what in Compared::ALL {
            let now = self.elector.leader_differs(what);
            let before = &self.differences_reported[what.index()];
            if now == *before {
                continue;
            }
            let event = match (&now, before) {
                (Some((holder, theirs)), _) => {
                    ElectionEvent::LeaderDiffers { what, holder: holder.clone(), theirs: Some(theirs.clone()) }
                }
                (None, Some((holder, _))) => {
                    ElectionEvent::LeaderDiffers { what, holder: holder.clone(), theirs: None }
                }
                (None, None) => continue,
            };
            self.differences_reported[what.index()] = now;
            self.send(event).await;
        }
    }

    /// While this node cannot carry the VIP: the Lease read, not written
    /// ([`Elector::observe_only`]), within a renew deadline, and what it says reported.
    async fn observe_only(&mut self) {
        match tokio::time::timeout(self.cfg.renew_deadline, self.elector.observe_only()).await {
            Ok(Ok(())) => self.report_api(true, None).await,
            Ok(Err(e)) => self.report_api(false, Some(error_chain(&e))).await,
            Err(_) => self.report_api(false, Some(format!("no answer within {:?}", self.cfg.renew_deadline))).await,
        }
        self.report_leader_differences().await;
        self.report_holder().await;
    }

    /// Reports the Lease's holder as last read, if it changed since the last report.
    async fn report_holder(&mut self) {
        let holder = self.elector.observed_holder().map(str::to_owned);
        if self.holder_reported.as_ref() != Some(&holder) {
            self.holder_reported = Some(holder.clone());
            self.send(ElectionEvent::Holder { holder }).await;
        }
    }

    async fn report_duplicate(&mut self) {
        let Some(other) = self.elector.duplicate().map(str::to_owned) else { return };
        // Sent again on every change: the holder's announcement carries a count it
        // raises every `DUPLICATE_REFRESH`, which keeps the node's gauge up; the event
        // names the instance alone.
        if self.duplicate_reported.as_deref() != Some(other.as_str()) {
            self.duplicate_reported = Some(other.clone());
            let other_instance = other.split_whitespace().next().unwrap_or("").to_owned();
            self.send(ElectionEvent::DuplicateIdentity { other_instance }).await;
        }
    }
}

/// Runs the election until `stop` turns true: tries every `retry_period`, only while
/// `eligible` (this node can carry the VIP: apiserver ready, link up, no foreign
/// claimant); steps down (and releases) as soon as it turns false; on stop, steps down
/// and releases if leading. The [`Fence`] is driven from here; `tx` gets the changes.
/// `initially_leading`: the data plane already answers (adopted from the previous agent
/// on this node, whose Lease this one takes over): no probe, the adopted deadline is the
/// fence until the first renewal.
pub async fn run<A: LeaseApi, F: Fence>(
    elector: Elector<A>,
    fence: F,
    mut eligible: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<ElectionEvent>,
    initially_leading: bool,
) {
    let cfg = elector.config().clone();
    let mut run = Run {
        elector,
        fence,
        cfg: cfg.clone(),
        tx,
        leading: initially_leading,
        last_renew: Instant::now(),
        safe_from: Instant::now(),
        duplicate_reported: None,
        bootstrapping: cfg.bootstrap,
        unanswered_logged: None,
        unanswered_warned: false,
        differences_reported: Default::default(),
        holder_reported: None,
        api_reported: None,
    };
    let mut ticker = tokio::time::interval(cfg.retry_period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = eligible.changed() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        if !*eligible.borrow() {
            if run.leading {
                run.step_down("this node can no longer carry the VIP").await;
                run.release().await;
            } else {
                run.observe_only().await;
            }
            continue;
        }
        run.try_once().await;
    }
    if run.leading {
        run.fence.step_down();
        run.leading = false;
        // The agent is stopping and may no longer read the channel: never wait on it.
        let _ = run.tx.try_send(ElectionEvent::Following);
        run.release().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A Lease API failure is logged with its root cause: kube's outer message alone
    /// reads the same for a refused connection and an untrusted certificate.
    #[test]
    fn a_failed_lease_call_names_its_root_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Connect(#[source] Tls);
        #[derive(Debug, thiserror::Error)]
        #[error("invalid peer certificate: UnknownIssuer")]
        struct Tls;
        let e = ElectionError::Api(Box::new(Connect(Tls)));
        assert_eq!(error_chain(&e), "Lease API: client error (Connect): invalid peer certificate: UnknownIssuer");
    }

    /// An in-memory Lease store with the API server's resourceVersion semantics; counts
    /// its reads.
    #[derive(Clone, Default)]
    struct Store(Arc<Mutex<(u64, Option<Lease>)>>, Arc<std::sync::atomic::AtomicUsize>);

    impl Store {
        fn edit(&self, f: impl FnOnce(&mut Lease)) {
            let mut g = self.0.lock().unwrap();
            g.0 += 1;
            let rv = g.0.to_string();
            let l = g.1.as_mut().unwrap();
            f(l);
            l.metadata.resource_version = Some(rv);
        }

        fn delete(&self) {
            self.0.lock().unwrap().1 = None;
        }
    }

    impl LeaseApi for Store {
        async fn get(&self) -> Result<Option<Lease>, ElectionError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self.0.lock().unwrap().1.clone())
        }

        async fn create(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
            let mut g = self.0.lock().unwrap();
            if g.1.is_some() {
                return Ok(None);
            }
            g.0 += 1;
            let mut l = lease.clone();
            l.metadata.resource_version = Some(g.0.to_string());
            g.1 = Some(l.clone());
            Ok(Some(l))
        }

        async fn replace(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
            let mut g = self.0.lock().unwrap();
            let current_rv = g.1.as_ref().and_then(|l| l.metadata.resource_version.clone());
            if current_rv.is_none() || lease.metadata.resource_version != current_rv {
                return Ok(None);
            }
            g.0 += 1;
            let mut l = lease.clone();
            l.metadata.resource_version = Some(g.0.to_string());
            g.1 = Some(l.clone());
            Ok(Some(l))
        }
    }

    fn cfg(id: &str) -> ElectionConfig {
        ElectionConfig {
            lease_name: "vip".into(),
            lease_namespace: "kube-system".into(),
            identity: id.into(),
            instance: format!("{id}-1"),
            predecessor: None,
            lease_duration: Duration::from_secs(1),
            renew_deadline: Duration::from_millis(600),
            retry_period: Duration::from_millis(200),
            bootstrap: false,
            vips: "10.0.0.100".into(),
            flow_placement: "maglev1 m=65537 seed-check=000".into(),
        }
    }

    /// A follower whose VIPs or flow placement are not the leader's finds out from the
    /// Lease, each on its own; an agent that writes neither is not compared.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_follower_sees_where_the_leader_differs_from_it() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), ElectionConfig { vips: "10.0.0.100,10.0.0.101".into(), ..cfg("b") });
        let mut c = Elector::new(store.clone(), cfg("c"));
        let mut d = Elector::new(store.clone(), ElectionConfig { flow_placement: "other".into(), ..cfg("d") });
        a.try_acquire_or_renew().await.unwrap();
        for e in [&mut b, &mut c, &mut d] {
            e.try_acquire_or_renew().await.unwrap();
        }
        assert_eq!(b.leader_differs(Compared::Vips), Some(("a".into(), "10.0.0.100".into())));
        assert_eq!(b.leader_differs(Compared::FlowPlacement), None, "b places flows as a does");
        assert_eq!(c.leader_differs(Compared::Vips), None, "the same VIPs");
        assert_eq!(c.leader_differs(Compared::FlowPlacement), None);
        assert_eq!(d.leader_differs(Compared::FlowPlacement), Some(("a".into(), cfg("a").flow_placement)));
        assert_eq!(d.leader_differs(Compared::Vips), None, "d has a's VIPs");
        for what in Compared::ALL {
            assert_eq!(a.leader_differs(what), None, "the holder itself");
        }
        store.edit(|l| {
            for what in Compared::ALL {
                set_annotation(l, what.annotation(), None);
            }
        });
        b.try_acquire_or_renew().await.unwrap();
        d.try_acquire_or_renew().await.unwrap();
        assert_eq!(b.leader_differs(Compared::Vips), None, "an older leader writes none");
        assert_eq!(d.leader_differs(Compared::FlowPlacement), None, "an older leader writes none");
    }

    fn holder(store: &Store) -> Option<String> {
        store.0.lock().unwrap().1.as_ref().and_then(|l| holder_of(l).map(str::to_owned))
    }

    const HELD: Try = Try::Held { fenced_until: None };

    fn fenced(t: Try) -> bool {
        matches!(t, Try::Held { fenced_until: Some(_) })
    }

    /// client-go's optimistic renewal: the holder writes without reading while its last
    /// observation holds; a conflict (someone else wrote) sends it back to reading, in the
    /// same try; a follower and an expired observation always read.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_leader_renews_with_one_write_and_reads_after_a_conflict() {
        let reads = |store: &Store| store.1.load(std::sync::atomic::Ordering::Relaxed);
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        a.try_acquire_or_renew().await.unwrap();
        b.try_acquire_or_renew().await.unwrap();
        let before = reads(&store);
        for _ in 0..3 {
            tokio::time::advance(Duration::from_millis(200)).await;
            assert_eq!(a.try_acquire_or_renew().await.unwrap(), HELD);
        }
        assert_eq!(reads(&store), before, "a renewal read the Lease");
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following);
        assert_eq!(reads(&store), before + 1, "a follower always reads");
        store.edit(|l| set_annotation(l, "example.com/edited", Some("by hand".into())));
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), HELD, "renewed after the conflict, in the same try");
        assert_eq!(reads(&store), before + 2);
        let lease = store.0.lock().unwrap().1.clone().unwrap();
        assert_eq!(annotation(&lease, "example.com/edited"), Some("by hand"), "the edit was overwritten");
        tokio::time::advance(Duration::from_millis(1100)).await;
        a.try_acquire_or_renew().await.unwrap();
        assert_eq!(reads(&store), before + 3, "an observation past its duration is read again");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn first_node_creates_the_lease_and_waits_out_unknown_fences() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        let t = a.try_acquire_or_renew().await.unwrap();
        assert_eq!(t, Try::Held { fenced_until: Some(Instant::now() + Duration::from_secs(1)) });
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following);
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), HELD, "a renewal needs no wait");
        assert_eq!(holder(&store).as_deref(), Some("a"));
    }

    /// Expiry counts from when the follower *observed* the last change, not from the
    /// renewTime written by the holder's clock; an observed expiry needs no wait.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn expiry_is_judged_by_local_observation_time() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        a.try_acquire_or_renew().await.unwrap();
        // Skew a's renewTime a day into the past (without a new resourceVersion): b must
        // not care.
        {
            let mut g = store.0.lock().unwrap();
            let l = g.1.as_mut().unwrap();
            l.spec.as_mut().unwrap().renew_time = Some(MicroTime("2000-01-01T00:00:00Z".parse().unwrap()));
        }
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following, "b first observes the lease now");
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following, "not expired 900 ms after observation");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), HELD, "expired 1050 ms after observation: no wait");
        assert_eq!(holder(&store).as_deref(), Some("b"));
        let transitions = store.0.lock().unwrap().1.as_ref().unwrap().spec.as_ref().unwrap().lease_transitions;
        assert_eq!(transitions, Some(1));
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), Try::Following);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_renewal_seen_by_the_follower_restarts_its_wait() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        a.try_acquire_or_renew().await.unwrap();
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following);
        tokio::time::advance(Duration::from_millis(800)).await;
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), HELD);
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following, "b sees a new resourceVersion");
        tokio::time::advance(Duration::from_millis(800)).await;
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following, "only 800 ms since the renewal");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_clean_release_lets_a_follower_take_over_at_once() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        a.try_acquire_or_renew().await.unwrap();
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following);
        assert!(a.release().await.unwrap());
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), HELD, "no waiting after a clean release");
        assert!(!a.release().await.unwrap(), "a no longer holds it");
        let transitions = store.0.lock().unwrap().1.as_ref().unwrap().spec.as_ref().unwrap().lease_transitions;
        assert_eq!(transitions, Some(1), "a hand-over is a transition, as client-go counts them");
    }

    /// Deleting the Lease by hand while a leader's fence runs: whoever recreates it must
    /// wait a lease duration before answering.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_deleted_lease_recreated_is_held_only_after_earlier_fences_passed() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        a.try_acquire_or_renew().await.unwrap();
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), HELD);
        store.delete();
        assert!(fenced(b.try_acquire_or_renew().await.unwrap()), "b recreated it: fenced");
        assert_eq!(a.try_acquire_or_renew().await.unwrap(), Try::Following, "a sees b's Lease");
        // And a holder that recreates it itself is fenced too (someone else may have led
        // between the deletion and now).
        store.delete();
        assert!(fenced(a.try_acquire_or_renew().await.unwrap()));
    }

    /// The holder cleared or rewritten by hand: the leader may still be inside its fence.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_holder_rewritten_by_hand_is_not_taken_without_a_wait() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        a.try_acquire_or_renew().await.unwrap();
        a.try_acquire_or_renew().await.unwrap();
        // Cleared: vacant but not released.
        store.edit(|l| l.spec.as_mut().unwrap().holder_identity = None);
        assert!(fenced(b.try_acquire_or_renew().await.unwrap()), "a cleared holder is not a release");
        // An empty string is no holder either, and no release.
        let mut c = Elector::new(store.clone(), cfg("c"));
        store.edit(|l| l.spec.as_mut().unwrap().holder_identity = Some(String::new()));
        assert!(fenced(c.try_acquire_or_renew().await.unwrap()), "holder \"\" is not a release");
        // Rewritten to another node's name: that node sees someone else's instance and
        // waits for expiry like anyone else.
        let t = c.try_acquire_or_renew().await.unwrap();
        assert!(matches!(t, Try::Held { .. }));
        store.edit(|l| l.spec.as_mut().unwrap().holder_identity = Some("b".into()));
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Try::Following, "b's name, c's instance: not b's");
        tokio::time::advance(Duration::from_millis(1050)).await;
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), HELD, "taken after an observed expiry");
    }

    /// A restarted agent on the same node (sequential, not concurrent) takes its
    /// predecessor's Lease at once.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_restart_on_the_same_node_takes_its_own_lease_over_at_once() {
        let store = Store::default();
        let mut old = Elector::new(store.clone(), cfg("a"));
        old.try_acquire_or_renew().await.unwrap();
        old.try_acquire_or_renew().await.unwrap();
        let mut new = Elector::new(
            store.clone(),
            ElectionConfig { instance: "a-2".into(), predecessor: Some("a-1".into()), ..cfg("a") },
        );
        assert_eq!(new.try_acquire_or_renew().await.unwrap(), HELD);
        assert_eq!(old.try_acquire_or_renew().await.unwrap(), Try::Following, "the old instance's Lease is gone");
    }

    /// Two processes under one node name (a cloned VM): the second never takes the
    /// Lease while the first renews, and both learn of the other.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn two_processes_under_one_name_never_both_hold_and_both_notice() {
        let store = Store::default();
        let mut first = Elector::new(store.clone(), cfg("a"));
        let mut clone = Elector::new(store.clone(), ElectionConfig { instance: "a-clone".into(), ..cfg("a") });
        first.try_acquire_or_renew().await.unwrap();
        for _ in 0..10 {
            assert_eq!(first.try_acquire_or_renew().await.unwrap(), HELD);
            assert_eq!(clone.try_acquire_or_renew().await.unwrap(), Try::Following, "same name, other instance");
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        assert_eq!(clone.duplicate(), Some("a-1"), "the clone saw the first renewing");
        assert_eq!(first.try_acquire_or_renew().await.unwrap(), HELD);
        assert_eq!(first.duplicate().map(|d| d.split_whitespace().next().unwrap_or("")), Some("a-clone"));
    }

    /// Two nodes racing on the same resourceVersion: exactly one wins (the other gets a
    /// conflict), never both.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_lost_race_is_a_conflict_not_a_second_leader() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        a.try_acquire_or_renew().await.unwrap();
        assert!(a.release().await.unwrap());
        let lease = store.get().await.unwrap().unwrap();
        let take = |id: &str| {
            let mut l = lease.clone();
            l.spec.as_mut().unwrap().holder_identity = Some(id.into());
            l
        };
        let won_b = store.replace(&take("b")).await.unwrap().is_some();
        let won_c = store.replace(&take("c")).await.unwrap().is_some();
        assert!(won_b && !won_c, "exactly one of two racing writers wins");
    }

    #[test]
    fn lease_seconds_round_up_and_never_wrap() {
        let mut c = cfg("a");
        c.lease_duration = Duration::from_millis(1500);
        assert_eq!(c.lease_seconds(), 2);
        c.lease_duration = Duration::from_millis(1000);
        assert_eq!(c.lease_seconds(), 1);
        c.lease_duration = Duration::from_secs(4_294_967_297);
        assert_eq!(c.lease_seconds(), i32::MAX);
    }

    #[test]
    fn instance_ids_differ_and_are_written_as_16_hex_digits() {
        assert_ne!(random_bytes::<8>(), random_bytes::<8>());
        assert_eq!(instance_hex(&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0xff]), "00112233445566ff");
    }

    /// A fence that records what the election asked of it, in order.
    #[derive(Clone, Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        refuse: Option<[u8; 6]>,
    }

    impl Fence for Recorder {
        fn lead_until(&mut self, _until: Instant) {
            self.log.lock().unwrap().push("lead".into());
        }
        fn step_down(&mut self) {
            self.log.lock().unwrap().push("step_down".into());
        }
        async fn claim(&mut self) -> Result<(), ClaimConflict> {
            self.log.lock().unwrap().push("claim".into());
            self.refuse.map_or(Ok(()), |mac| Err(ClaimConflict { mac, simultaneous: false }))
        }
    }

    /// A store that logs releases into the fence's log, to check the order.
    #[derive(Clone)]
    struct LoggingStore(Store, Arc<Mutex<Vec<String>>>);

    impl LeaseApi for LoggingStore {
        async fn get(&self) -> Result<Option<Lease>, ElectionError> {
            self.0.get().await
        }
        async fn create(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
            self.0.create(lease).await
        }
        async fn replace(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
            if lease.spec.as_ref().and_then(|s| s.holder_identity.as_ref()).is_none() {
                self.1.lock().unwrap().push("release".into());
            }
            self.0.replace(lease).await
        }
    }

    /// The next event about leadership; the Lease API's reports met on the way are
    /// added to `api` (whether it answered), the holder's skipped.
    async fn next_role(rx: &mut mpsc::Receiver<ElectionEvent>, api: &mut Vec<bool>) -> Option<ElectionEvent> {
        loop {
            match rx.recv().await {
                Some(ElectionEvent::LeaseApi { answering, .. }) => api.push(answering),
                Some(ElectionEvent::Holder { .. }) => {}
                other => return other,
            }
        }
    }

    /// [`next_role`] without waiting: `None` if no such event is queued.
    fn try_next_role(rx: &mut mpsc::Receiver<ElectionEvent>, api: &mut Vec<bool>) -> Option<ElectionEvent> {
        loop {
            match rx.try_recv().ok() {
                Some(ElectionEvent::LeaseApi { answering, .. }) => api.push(answering),
                Some(ElectionEvent::Holder { .. }) => {}
                other => return other,
            }
        }
    }

    /// Stepping down is written to the data plane before the release is sent, so no
    /// follower can acquire while this node still answers.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_fence_steps_down_before_the_release_is_sent() {
        let fence = Recorder::default();
        let log = fence.log.clone();
        let store = LoggingStore(Store::default(), log.clone());
        let (eligible_tx, eligible) = watch::channel(true);
        let (_stop_tx, stop) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run(Elector::new(store, cfg("a")), fence, eligible, stop, tx, false));
        // Created afresh: a lease duration of waiting, then a claim, then leading.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut api = Vec::new();
        assert_eq!(next_role(&mut rx, &mut api).await, Some(ElectionEvent::Leading { bootstrap: false }));
        eligible_tx.send(false).unwrap();
        assert_eq!(next_role(&mut rx, &mut api).await, Some(ElectionEvent::Following));
        assert_eq!(api, [true], "the API answered from the first try, reported once");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = log.lock().unwrap().clone();
        let claim = log.iter().position(|e| e == "claim").unwrap();
        assert_eq!(log[claim + 1], "lead");
        let down = log.iter().position(|e| e == "step_down").expect("stepped down");
        let release = log.iter().position(|e| e == "release").expect("released");
        assert!(down < release, "{log:?}");
        task.abort();
    }

    /// A Lease API that refuses (403, as during `kubeadm init` before RBAC exists), then
    /// answers.
    #[derive(Clone)]
    struct Refusing(Store, Arc<Mutex<bool>>, Arc<Mutex<u16>>);

    impl Refusing {
        /// A store that answers while `refusing` is false, else with 403 (or the status
        /// set in the third field).
        fn new(store: Store, refusing: Arc<Mutex<bool>>) -> Self {
            Self(store, refusing, Arc::new(Mutex::new(403)))
        }

        fn check(&self) -> Result<(), ElectionError> {
            if *self.1.lock().unwrap() {
                let code = *self.2.lock().unwrap();
                return Err(ElectionError::Status { code, message: "refused".into() });
            }
            Ok(())
        }
    }

    impl LeaseApi for Refusing {
        async fn get(&self) -> Result<Option<Lease>, ElectionError> {
            self.check()?;
            self.0.get().await
        }
        async fn create(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
            self.check()?;
            self.0.create(lease).await
        }
        async fn replace(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
            self.check()?;
            self.0.replace(lease).await
        }
    }

    /// An election run on `store` by node "a", which cannot carry the VIP: the task, its
    /// events, and the senders that keep it running.
    fn ineligible_run(
        store: Refusing,
    ) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<ElectionEvent>, [watch::Sender<bool>; 2]) {
        let (eligible_tx, eligible) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(run(Elector::new(store, cfg("a")), Recorder::default(), eligible, stop, tx, false));
        (task, rx, [eligible_tx, stop_tx])
    }

    /// While the API does not answer, a new error is reported (at most once a second),
    /// so status shows the current cause, not the first one of the outage.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_changed_error_of_a_silent_api_is_reported() {
        let refusing = Arc::new(Mutex::new(true));
        let store = Refusing::new(Store::default(), refusing.clone());
        let (task, mut rx, _senders) = ineligible_run(store.clone());
        let collect = |rx: &mut mpsc::Receiver<ElectionEvent>, errors: &mut Vec<String>| loop {
            match rx.try_recv() {
                Ok(ElectionEvent::LeaseApi { answering: false, error }) => errors.push(error.unwrap_or_default()),
                Ok(ElectionEvent::Holder { .. }) => {}
                _ => break,
            }
        };
        let mut errors = Vec::new();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        collect(&mut rx, &mut errors);
        assert_eq!(errors.len(), 1, "the same error reported again: {errors:?}");
        *store.2.lock().unwrap() = 500;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        collect(&mut rx, &mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("403") && errors[1].contains("500"), "{errors:?}");
        task.abort();
    }

    /// A node that cannot carry the VIP still reads the Lease, writing nothing, so
    /// whether the API answers is reported as it is, not as it was when the node last
    /// tried (a trial saw "answering" for a node cut off from the API).
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_ineligible_node_keeps_reporting_whether_the_api_answers() {
        let refusing = Arc::new(Mutex::new(false));
        let store = Refusing::new(Store::default(), refusing.clone());
        let (task, mut rx, _senders) = ineligible_run(store.clone());
        let mut api = Vec::new();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(try_next_role(&mut rx, &mut api).is_none(), "an ineligible node took a role");
        assert_eq!(api, [true]);
        *refusing.lock().unwrap() = true;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(try_next_role(&mut rx, &mut api).is_none());
        assert_eq!(api, [true, false]);
        assert!(store.0 .0.lock().unwrap().1.is_none(), "an ineligible node wrote the Lease");
        task.abort();
    }

    /// Bootstrap: while the API refuses, the node holds the VIP after a clean probe;
    /// when the API answers, it takes the Lease and keeps answering without a gap.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn bootstrap_holds_the_vip_until_the_lease_api_answers_then_keeps_it() {
        let fence = Recorder::default();
        let log = fence.log.clone();
        let refusing = Arc::new(Mutex::new(true));
        let store = Store::default();
        let api = Refusing::new(store.clone(), refusing.clone());
        let (_e, eligible) = watch::channel(true);
        let (_s, stop) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(16);
        let cfg = ElectionConfig { bootstrap: true, ..cfg("a") };
        let task = tokio::spawn(run(Elector::new(api, cfg), fence, eligible, stop, tx, false));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut api = Vec::new();
        let first = next_role(&mut rx, &mut api).await;
        assert_eq!(first, Some(ElectionEvent::Leading { bootstrap: true }), "held while the API refuses");
        assert_eq!(holder(&store), None);
        *refusing.lock().unwrap() = false;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(holder(&store).as_deref(), Some("a"), "took the Lease once the API answered");
        let backed = try_next_role(&mut rx, &mut api);
        assert_eq!(backed, Some(ElectionEvent::Leading { bootstrap: false }), "the Lease backs the hold");
        assert_eq!(try_next_role(&mut rx, &mut api), None, "no step-down in between");
        assert_eq!(api, [false, true], "the API's outage and its end, each reported once");
        let log = log.lock().unwrap().clone();
        assert!(!log.contains(&"step_down".to_string()), "{log:?}");
        assert_eq!(log.iter().filter(|e| *e == "claim").count(), 1, "{log:?}");
        task.abort();
    }

    /// Without `--bootstrap`, a refusing API means nobody leads (a cut-off node must not).
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn without_bootstrap_a_refusing_api_means_no_leader() {
        let fence = Recorder::default();
        let log = fence.log.clone();
        let api = Refusing::new(Store::default(), Arc::new(Mutex::new(true)));
        let (_e, eligible) = watch::channel(true);
        let (_s, stop) = watch::channel(false);
        let (tx, _rx) = mpsc::channel(16);
        let task = tokio::spawn(run(Elector::new(api, cfg("a")), fence, eligible, stop, tx, false));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
        task.abort();
    }

    /// A foreign host answering the claim probe: the Lease is released, nothing led.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_refused_claim_releases_the_lease_and_never_leads() {
        let fence = Recorder { refuse: Some([2, 0, 0, 0, 0, 0x66]), ..Default::default() };
        let log = fence.log.clone();
        let store = Store::default();
        let (_e, eligible) = watch::channel(true);
        let (_s, stop) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run(Elector::new(store.clone(), cfg("a")), fence, eligible, stop, tx, false));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            next_role(&mut rx, &mut Vec::new()).await,
            Some(ElectionEvent::ClaimRefused { mac: [2, 0, 0, 0, 0, 0x66], simultaneous: false })
        );
        assert!(!log.lock().unwrap().contains(&"lead".to_string()));
        assert_eq!(holder(&store), None, "released");
        task.abort();
    }
}
