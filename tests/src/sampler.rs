//! An ARP sampler on the lab's client: sends a request for the VIP every few
//! milliseconds and records every MAC that answers, so a test can assert that at no
//! moment two nodes answered, and when a node started answering.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{apilab::ApiLab, netns::arp_probe};

/// When each probe was sent, and the MACs that answered it.
pub type Samples = Vec<(Instant, Vec<[u8; 6]>)>;

/// A running sampler; [`Sampler::finish`] stops it and checks it.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Samples>>,
}

impl Sampler {
    pub fn start(lab: &ApiLab) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, ns, vip) = (stop.clone(), lab.client_ns().name.clone(), lab.vip);
        let src = Ipv4Addr::new(vip.octets()[0], vip.octets()[1], vip.octets()[2], 2);
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let t = Instant::now();
                if let Ok(macs) = arp_probe(&ns, "eth0", src, vip, Duration::from_millis(30)) {
                    samples.push((t, macs));
                }
            }
            samples
        });
        Self { stop, handle: Some(handle) }
    }

    /// Stops sampling; fails if any sample saw two answerers. Returns the samples.
    pub fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::SeqCst);
        let samples = self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let overlaps: Vec<_> = samples.iter().filter(|(_, m)| m.len() > 1).collect();
        assert!(
            overlaps.is_empty(),
            "{} of {} samples saw two answerers: {:?}",
            overlaps.len(),
            samples.len(),
            overlaps.first()
        );
        assert!(samples.len() >= 8, "only {} ARP samples", samples.len());
        samples
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The first instant after `from` at which the sampler saw `mac` answer.
pub fn first_answer_by(samples: &Samples, mac: [u8; 6], from: Instant) -> Option<Duration> {
    samples.iter().find(|(t, m)| *t >= from && m.contains(&mac)).map(|(t, _)| *t - from)
}
