//! The speaker over in-memory connections with paused time: the test plays the router.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{
    io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream},
    sync::mpsc,
    time::timeout,
};

use super::*;
use crate::codec::{decode, encode, AsPathEncoding, Message, Notification, Open, Update};
use crate::session::State;

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// Hands the far end of each connection to the test, or refuses while `refuse` is set.
#[derive(Clone)]
struct MemoryConnector {
    accepted: mpsc::UnboundedSender<DuplexStream>,
    refuse: Arc<AtomicBool>,
}

impl Connector for MemoryConnector {
    type Stream = DuplexStream;

    fn connect(&self) -> impl std::future::Future<Output = Result<DuplexStream, String>> + Send + 'static {
        let this = self.clone();
        async move {
            if this.refuse.load(Ordering::SeqCst) {
                return Err("connection refused".to_owned());
            }
            let (ours, theirs) = duplex(64 * 1024);
            this.accepted.send(theirs).map_err(|_| "test over".to_owned())?;
            Ok(ours)
        }
    }
}

struct Lab {
    speaker: SpeakerHandle,
    connections: mpsc::UnboundedReceiver<DuplexStream>,
    refuse: Arc<AtomicBool>,
}

fn start() -> Lab {
    let (accepted, connections) = mpsc::unbounded_channel();
    let refuse = Arc::new(AtomicBool::new(false));
    let connector = MemoryConnector { accepted, refuse: refuse.clone() };
    let mut config = SpeakerConfig::new(vec![PeerConfig::new(ROUTER, 65001, 65000, NODE, NODE)]);
    config.shutdown_communication = "test over".into();
    let speaker = Speaker::start_with(config, |_| connector.clone()).unwrap();
    Lab { speaker, connections, refuse }
}

/// The router's end of one connection.
struct Router {
    stream: DuplexStream,
    received: Vec<u8>,
}

impl Router {
    async fn accept(lab: &mut Lab) -> Self {
        let stream = timeout(Duration::from_secs(60), lab.connections.recv()).await.unwrap().unwrap();
        Self { stream, received: Vec::new() }
    }

    /// The next message, or `None` once the speaker closed its side.
    async fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some((message, used)) = decode(&self.received).unwrap() {
                self.received.drain(..used);
                return Some(message);
            }
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return None;
            }
            self.received.extend_from_slice(&buf[..n]);
        }
    }

    /// The next message that is not a KEEPALIVE.
    async fn recv_skipping_keepalives(&mut self) -> Option<Message> {
        loop {
            match self.recv().await {
                Some(Message::Keepalive) => continue,
                other => return other,
            }
        }
    }

    async fn send(&mut self, message: Message) {
        self.stream.write_all(&encode(&message).unwrap()).await.unwrap();
    }

    async fn establish(lab: &mut Lab, hold_time: u16) -> Self {
        let mut router = Self::accept(lab).await;
        assert_eq!(router.recv().await, Some(Message::Open(Open::new(65000, 9, NODE))));
        router.send(Message::Open(Open::new(65001, hold_time, ROUTER))).await;
        router.send(Message::Keepalive).await;
        assert_eq!(router.recv().await, Some(Message::Keepalive));
        router
    }
}

fn vip(last: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(192, 0, 2, last), 32).unwrap()
}

fn announcement(prefixes: &[Ipv4Net]) -> Message {
    Message::Update(Update::announce(prefixes, 65000, NODE, AsPathEncoding::FourOctet).remove(0))
}

fn withdrawal(prefixes: &[Ipv4Net]) -> Message {
    Message::Update(Update::withdraw(prefixes).remove(0))
}

async fn wait_for(lab: &Lab, what: impl Fn(&PeerStatus) -> bool) -> PeerStatus {
    for _ in 0..1000 {
        let status = lab.speaker.status().remove(0);
        if what(&status) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("status never matched: {:?}", lab.speaker.status());
}

#[tokio::test(start_paused = true)]
async fn an_established_session_gets_the_whole_set_then_only_the_changes() {
    let mut lab = start();
    lab.speaker.set_advertised([vip(10), vip(11)]);
    let mut router = Router::establish(&mut lab, 9).await;
    assert_eq!(router.recv_skipping_keepalives().await, Some(announcement(&[vip(10), vip(11)])));

    lab.speaker.set_advertised([vip(11), vip(12)]);
    assert_eq!(router.recv_skipping_keepalives().await, Some(withdrawal(&[vip(10)])));
    assert_eq!(router.recv_skipping_keepalives().await, Some(announcement(&[vip(12)])));

    lab.speaker.set_advertised([vip(12), vip(11)]); // same set: nothing
    lab.speaker.set_advertised([]);
    assert_eq!(router.recv_skipping_keepalives().await, Some(withdrawal(&[vip(11), vip(12)])));
}

#[tokio::test(start_paused = true)]
async fn a_silent_router_gets_keepalives_then_hold_timer_expired_and_a_new_connection_a_second_later() {
    let mut lab = start();
    let mut router = Router::establish(&mut lab, 9).await;
    let established = Instant::now();
    let mut keepalives = Vec::new();
    let notification = loop {
        match router.recv().await {
            Some(Message::Keepalive) => keepalives.push(established.elapsed()),
            Some(Message::Notification(notification)) => break notification,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(keepalives, vec![Duration::from_secs(3), Duration::from_secs(6)]);
    assert_eq!((notification.code, notification.subcode), (4, 0));
    assert_eq!(established.elapsed(), Duration::from_secs(9));
    assert_eq!(router.recv().await, None, "the speaker half-closes after its NOTIFICATION");
    drop(router);

    let failed = Instant::now();
    let _again = Router::accept(&mut lab).await;
    let retry = failed.elapsed();
    assert!(retry >= Duration::from_millis(800) && retry <= Duration::from_millis(1300), "{retry:?}");
    let status = lab.speaker.status().remove(0);
    assert_eq!(status.last_error.as_deref(), Some("hold timer expired"));
}

#[tokio::test(start_paused = true)]
async fn status_reports_state_uptime_counters_hold_time_and_advertised_prefixes() {
    let mut lab = start();
    assert_eq!(lab.speaker.status()[0].address, ROUTER);
    lab.speaker.set_advertised([vip(10)]);
    let mut router = Router::establish(&mut lab, 30).await;
    assert_eq!(router.recv_skipping_keepalives().await, Some(announcement(&[vip(10)])));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = lab.speaker.status().remove(0);
    assert_eq!(status.state, State::Established);
    assert_eq!(status.state.name(), "Established");
    assert_eq!(status.hold_time, Some(9));
    assert_eq!(status.advertised, vec![vip(10)]);
    assert!(status.is_advertising());
    assert_eq!((status.messages_received, status.messages_sent), (2, 3)); // OPEN+KEEPALIVE in; OPEN, KEEPALIVE, UPDATE out
    let uptime = status.uptime.unwrap();
    assert!(uptime >= Duration::from_millis(2500) && uptime < Duration::from_secs(3), "{uptime:?}");

    router.send(Message::Notification(Notification::new(6, 2, vec![]))).await;
    let status = wait_for(&lab, |s| s.state != State::Established).await;
    assert_eq!(status.last_error.as_deref(), Some("NOTIFICATION received 6/2 (Cease, Administrative Shutdown)"));
    assert_eq!((status.uptime, status.hold_time, status.advertised.len()), (None, None, 0));
    assert!(!status.is_advertising());
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_shows_in_status_and_is_retried_with_backoff() {
    let mut lab = start();
    lab.refuse.store(true, Ordering::SeqCst);
    let status = wait_for(&lab, |s| s.last_error.is_some()).await;
    assert_eq!(status.state, State::Active);
    assert_eq!(status.last_error.as_deref(), Some("connect: connection refused"));
    let refused_at = Instant::now();
    lab.refuse.store(false, Ordering::SeqCst);
    Router::establish(&mut lab, 9).await;
    assert!(refused_at.elapsed() <= Duration::from_millis(1300));
    wait_for(&lab, |s| s.state == State::Established).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_withdraws_sends_cease_and_half_closes_then_waits_for_the_router() {
    let mut lab = start();
    lab.speaker.set_advertised([vip(10)]);
    let mut router = Router::establish(&mut lab, 9).await;
    assert_eq!(router.recv_skipping_keepalives().await, Some(announcement(&[vip(10)])));

    let started = Instant::now();
    let shutdown = tokio::spawn(lab.speaker.shutdown(Duration::from_secs(5)));
    assert_eq!(router.recv_skipping_keepalives().await, Some(withdrawal(&[vip(10)])));
    let cease = Notification::administrative_shutdown(&ShutdownCommunication::new("test over"));
    assert_eq!(router.recv().await, Some(Message::Notification(cease)));
    assert_eq!(router.recv().await, None, "half-closed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!shutdown.is_finished(), "the speaker waits for the router to close");
    drop(router);
    shutdown.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_waiting_for_a_router_that_never_closes_at_the_timeout() {
    let mut lab = start();
    let _router = Router::establish(&mut lab, 9).await;
    let started = Instant::now();
    lab.speaker.shutdown(Duration::from_secs(2)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took <= Duration::from_millis(2100), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_malformed_message_is_answered_with_its_notification() {
    let mut lab = start();
    let mut router = Router::establish(&mut lab, 9).await;
    let mut bad_type = encode(&Message::Keepalive).unwrap();
    bad_type[18] = 5;
    router.stream.write_all(&bad_type).await.unwrap();
    assert_eq!(router.recv_skipping_keepalives().await, Some(Message::Notification(Notification::new(1, 3, vec![5]))));
    let status = wait_for(&lab, |s| s.state != State::Established).await;
    assert!(status.last_error.unwrap().contains("bad message type 5"));
}

#[tokio::test]
async fn start_refuses_an_invalid_configuration() {
    let mut peer = PeerConfig::new(ROUTER, 65001, 65000, NODE, NODE);
    peer.hold_time = Duration::from_secs(2);
    let err = Speaker::start(SpeakerConfig::new(vec![peer])).err().unwrap();
    assert!(matches!(err, StartError::Config(ConfigError::HoldTime { .. })), "{err}");
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let peer = PeerConfig::new(ROUTER, 65001, 65000, NODE, NODE);
    assert!(matches!(Speaker::start(SpeakerConfig::new(vec![peer])), Err(StartError::NoRuntime)));
}
