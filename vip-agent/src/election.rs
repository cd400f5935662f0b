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
//!   `t + renew_deadline` in the XDP map. Another node can acquire only `lease_duration`
//!   after it observed that renew, which happened after `t`; since `renew_deadline <
//!   lease_duration`, a crashed, hung or partitioned leader stops answering ARP before
//!   anyone else can start. Two nodes never answer at once.
//! - Graceful stop, or the local apiserver turning unready, releases the Lease (holder
//!   cleared): a follower takes over at its next try instead of waiting for expiry.
//!
//! kube-lease-manager 0.13 is not used: it compares the holder's clock with the local
//! one, steals and renews without preconditions, has no fencing and whole-second timers.

use std::{future::Future, time::Duration};

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
use tracing::{debug, info, warn};

/// Election timing and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    /// How long a Lease stays valid after a change was observed. Written to the Lease
    /// rounded up to whole seconds (the API's unit); kept in milliseconds inside.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading (and its XDP deadline
    /// has already passed). Less than `lease_duration`.
    pub renew_deadline: Duration,
    /// Time between two tries, for leader and followers alike.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// `leaseDurationSeconds` as written to the Lease.
    pub fn lease_seconds(&self) -> i32 {
        self.lease_duration.as_millis().div_ceil(1000).max(1) as i32
    }
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

/// The Lease through kube's client.
pub struct KubeLeases {
    api: Api<Lease>,
    name: String,
}

impl KubeLeases {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_owned() }
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
        match self.api.get(&self.name).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if is_code(&e, 404) => Ok(None),
            Err(e) => Err(api_err(e)),
        }
    }

    async fn create(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
        match self.api.create(&PostParams::default(), lease).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if is_code(&e, 409) => Ok(None),
            Err(e) => Err(api_err(e)),
        }
    }

    async fn replace(&self, lease: &Lease) -> Result<Option<Lease>, ElectionError> {
        match self.api.replace(&self.name, &PostParams::default(), lease).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if is_code(&e, 409) => Ok(None),
            Err(e) => Err(api_err(e)),
        }
    }
}

/// client-go's tryAcquireOrRenew, on an observed state.
pub struct Elector<A> {
    api: A,
    cfg: ElectionConfig,
    /// resourceVersion last seen, and the local time it was first seen.
    observed: Option<(String, Instant)>,
    /// The Lease as last seen (for release).
    last: Option<Lease>,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty())
}

impl<A: LeaseApi> Elector<A> {
    pub fn new(api: A, cfg: ElectionConfig) -> Self {
        Self { api, cfg, observed: None, last: None }
    }

    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    /// The holder as last observed.
    pub fn observed_holder(&self) -> Option<&str> {
        self.last.as_ref().and_then(holder_of)
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().map(|(r, _)| r) != Some(&rv) {
            self.observed = Some((rv, now));
        }
        self.last = Some(lease.clone());
    }

    /// One try to acquire or renew. `Ok(true)`: this node holds the Lease as of the
    /// moment the try started.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, ElectionError> {
        let me = self.cfg.identity.clone();
        let Some(current) = self.api.get().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.lease_namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.cfg.lease_seconds()),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&lease).await? {
                Some(created) => {
                    self.observe(&created, Instant::now());
                    Ok(true)
                }
                None => Ok(false),
            };
        };
        let now = Instant::now();
        self.observe(&current, now);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = holder_of(&current).map(str::to_owned);
        let held_by_me = holder.as_deref() == Some(me.as_str());
        if let (Some(other), false) = (&holder, held_by_me) {
            let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            let observed_at = self.observed.as_ref().map_or(now, |(_, t)| *t);
            if observed_at + duration > now {
                debug!(holder = %other, "Lease held by another node and not expired");
                return Ok(false);
            }
        }
        let mut next = current.clone();
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(me);
        new_spec.lease_duration_seconds = Some(self.cfg.lease_seconds());
        new_spec.renew_time = Some(now_micro());
        if !held_by_me {
            new_spec.acquire_time = Some(now_micro());
            if holder.is_some() {
                new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        next.spec = Some(new_spec);
        match self.api.replace(&next).await? {
            Some(updated) => {
                self.observe(&updated, Instant::now());
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Gives the Lease up if this node holds it: holder cleared, duration 1 s, as
    /// client-go's ReleaseOnCancel does. Conditional on the resourceVersion.
    pub async fn release(&mut self) -> Result<bool, ElectionError> {
        let Some(current) = self.api.get().await? else { return Ok(false) };
        if holder_of(&current) != Some(self.cfg.identity.as_str()) {
            return Ok(false);
        }
        let mut next = current.clone();
        let mut spec = current.spec.clone().unwrap_or_default();
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        next.spec = Some(spec);
        Ok(self.api.replace(&next).await?.is_some())
    }
}

/// What the election tells the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Lead until this local instant (the XDP deadline); sent on every successful renew.
    Leading { until: Instant },
    /// Do not lead (lost, stepped down, or never had it).
    Following,
}

/// Runs the election until `stop` turns true: tries every `retry_period`, only while
/// `ready` (the local apiserver) is true; steps down (and releases) as soon as it turns
/// false; on stop, releases the Lease if held. Sends [`Leadership`] changes and renewals.
pub async fn run<A: LeaseApi>(
    mut elector: Elector<A>,
    mut ready: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<Leadership>,
) {
    let cfg = elector.config().clone();
    let mut leading_since: Option<Instant> = None;
    let mut last_renew = Instant::now();
    let mut ticker = tokio::time::interval(cfg.retry_period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = ready.changed() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let is_ready = *ready.borrow();
        if leading_since.is_some() && !is_ready {
            warn!("local apiserver not ready: stepping down and releasing the Lease");
            leading_since = None;
            let _ = tx.send(Leadership::Following).await;
            release(&mut elector, cfg.renew_deadline).await;
            continue;
        }
        if !is_ready {
            continue;
        }
        let start = Instant::now();
        // A leader's try may use what is left of its renew deadline; a follower's, one
        // retry period.
        let budget = match leading_since {
            Some(_) => (last_renew + cfg.renew_deadline).saturating_duration_since(start),
            None => cfg.retry_period,
        }
        .max(Duration::from_millis(50));
        let held = match tokio::time::timeout(budget, elector.try_acquire_or_renew()).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                debug!(error = %e, "Lease try failed");
                false
            }
            Err(_) => {
                debug!(?budget, "Lease try timed out");
                false
            }
        };
        if held {
            last_renew = start;
            if leading_since.is_none() {
                info!(identity = %cfg.identity, "acquired the Lease: leading");
                leading_since = Some(start);
            }
            let _ = tx.send(Leadership::Leading { until: start + cfg.renew_deadline }).await;
        } else if leading_since.is_some() && Instant::now() >= last_renew + cfg.renew_deadline {
            warn!(since_renew = ?last_renew.elapsed(), "could not renew the Lease in time: stepping down");
            leading_since = None;
            let _ = tx.send(Leadership::Following).await;
        } else if leading_since.is_none() {
            debug!(holder = ?elector.observed_holder(), "following");
        }
    }
    if leading_since.is_some() {
        // The agent is stopping and may no longer read the channel: never wait on it.
        let _ = tx.try_send(Leadership::Following);
        release(&mut elector, cfg.renew_deadline).await;
    }
}

async fn release<A: LeaseApi>(elector: &mut Elector<A>, budget: Duration) {
    match tokio::time::timeout(budget, elector.release()).await {
        Ok(Ok(true)) => info!("released the Lease"),
        Ok(Ok(false)) => debug!("Lease not held: nothing to release"),
        Ok(Err(e)) => warn!(error = %e, "releasing the Lease failed (it will expire)"),
        Err(_) => warn!("releasing the Lease timed out (it will expire)"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// An in-memory Lease store with the API server's resourceVersion semantics.
    #[derive(Clone, Default)]
    struct Store(Arc<Mutex<(u64, Option<Lease>)>>);

    impl LeaseApi for Store {
        async fn get(&self) -> Result<Option<Lease>, ElectionError> {
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
            lease_duration: Duration::from_secs(1),
            renew_deadline: Duration::from_millis(600),
            retry_period: Duration::from_millis(200),
        }
    }

    fn holder(store: &Store) -> Option<String> {
        store.0.lock().unwrap().1.as_ref().and_then(|l| holder_of(l).map(str::to_owned))
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn first_node_creates_and_holds_the_lease_others_follow() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
        assert!(a.try_acquire_or_renew().await.unwrap(), "renew");
        assert_eq!(holder(&store).as_deref(), Some("a"));
    }

    /// Expiry counts from when the follower *observed* the last change, not from the
    /// renewTime written by the holder's clock.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn expiry_is_judged_by_local_observation_time() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        // Skew a's renewTime a day into the past: b must not care.
        {
            let mut g = store.0.lock().unwrap();
            let l = g.1.as_mut().unwrap();
            l.spec.as_mut().unwrap().renew_time = Some(MicroTime("2000-01-01T00:00:00Z".parse().unwrap()));
        }
        assert!(!b.try_acquire_or_renew().await.unwrap(), "b first observes the lease now");
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!b.try_acquire_or_renew().await.unwrap(), "not expired 900 ms after observation");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(b.try_acquire_or_renew().await.unwrap(), "expired 1050 ms after observation");
        assert_eq!(holder(&store).as_deref(), Some("b"));
        let transitions = store.0.lock().unwrap().1.as_ref().unwrap().spec.as_ref().unwrap().lease_transitions;
        assert_eq!(transitions, Some(1));
        // And a renewal by the holder resets the follower's clock.
        assert!(!a.try_acquire_or_renew().await.unwrap());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_renewal_seen_by_the_follower_restarts_its_wait() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_millis(800)).await;
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap(), "b sees a new resourceVersion");
        tokio::time::advance(Duration::from_millis(800)).await;
        assert!(!b.try_acquire_or_renew().await.unwrap(), "only 800 ms since b observed the renewal");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn release_lets_a_follower_take_over_at_once() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        let mut b = Elector::new(store.clone(), cfg("b"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
        assert!(a.release().await.unwrap());
        assert!(b.try_acquire_or_renew().await.unwrap(), "no waiting for expiry after a release");
        assert!(!a.release().await.unwrap(), "a no longer holds it");
    }

    /// Two nodes racing on the same resourceVersion: exactly one wins (the other gets a
    /// conflict), never both.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_lost_race_is_a_conflict_not_a_second_leader() {
        let store = Store::default();
        let mut a = Elector::new(store.clone(), cfg("a"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(a.release().await.unwrap());
        // b and c both read the released lease, then both try to take it.
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
    fn lease_seconds_round_up() {
        let mut c = cfg("a");
        c.lease_duration = Duration::from_millis(1500);
        assert_eq!(c.lease_seconds(), 2);
        c.lease_duration = Duration::from_millis(1000);
        assert_eq!(c.lease_seconds(), 1);
    }
}
