//! The BGP finite state machine for one peer (RFC 4271 §8), announce-only and active-only,
//! without I/O: [`Session::handle`] takes an [`Event`] and returns the [`Action`]s the
//! driver must carry out, in order. Time never appears here; timers are actions, and
//! their expiry comes back as an event.
//!
//! States and how we use them:
//! - **Idle**: not started, stopped, or waiting (connect-retry timer) after a session
//!   failed: the automatic restart of RFC 4271 §8.1.1 with exponential backoff.
//! - **Connect**: a TCP connection attempt is under way, bounded by the connect-retry
//!   timer.
//! - **Active**: the attempt failed or timed out; waiting for the connect-retry timer. We
//!   never listen on port 179, so unlike RFC 4271 this state accepts no connection.
//! - **OpenSent**, **OpenConfirm**, **Established** as in RFC 4271 §8.2.2.
//!
//! No connection collision detection (§6.8): with a single, outgoing connection there
//! is never a second one to collide with.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;

use crate::backoff::Backoff;
use crate::codec::notification as n;
use crate::codec::{AsPathEncoding, DecodeError, Message, Notification, Open, ShutdownCommunication, Update};

/// Hold timer while we wait for the peer's OPEN: "a large value", 4 minutes being the
/// suggestion of RFC 4271 §8.2.2 (Connect state, Event 17).
pub const OPEN_WAIT_HOLD_TIME: Duration = Duration::from_secs(240);

/// What the session needs to know about us and the peer, already validated
/// ([`crate::speaker::PeerConfig`] builds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub local_as: u32,
    /// The AS the peer must open with (2/2 Bad Peer AS otherwise).
    pub remote_as: u32,
    /// Our BGP Identifier.
    pub router_id: Ipv4Addr,
    /// Hold time we propose, in seconds: 0 or at least 3.
    pub hold_time: u16,
    /// Interval between our KEEPALIVEs, lowered to a third of the negotiated hold time
    /// if above it. Not zero.
    pub keepalive: Duration,
    /// NEXT_HOP of our announcements.
    pub next_hop: Ipv4Addr,
    /// How long one TCP connection attempt may take.
    pub connect_timeout: Duration,
    /// The connection is signed (TCP-MD5, RFC 2385): a router whose password differs
    /// drops every segment without a word, so a connect without answer names it as a
    /// cause.
    pub tcp_md5: bool,
}

/// RFC 4271 §8.2.2 states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    /// Every state, in RFC 4271 §8.2.2's order.
    pub const ALL: [State; 6] =
        [Self::Idle, Self::Connect, Self::Active, Self::OpenSent, Self::OpenConfirm, Self::Established];

    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Connect => "Connect",
            Self::Active => "Active",
            Self::OpenSent => "OpenSent",
            Self::OpenConfirm => "OpenConfirm",
            Self::Established => "Established",
        }
    }

    /// A TCP connection is up in this state.
    fn connected(self) -> bool {
        matches!(self, Self::OpenSent | Self::OpenConfirm | Self::Established)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The session's timers (RFC 4271 §8: ConnectRetryTimer, HoldTimer, KeepaliveTimer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timer {
    ConnectRetry,
    Hold,
    Keepalive,
}

/// Inputs to the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Start connecting (RFC 4271 Event 1, ManualStart).
    Start,
    /// Leave for good (Event 2, ManualStop): withdraw, Cease 6/2, close; no restart.
    Stop(ShutdownCommunication),
    /// The TCP connection we initiated is up (Event 16, Tcp_CR_Acked).
    TcpConnected,
    /// The TCP connection attempt failed (Event 18), with the reason.
    TcpConnectFailed(String),
    /// An established TCP connection ended (peer closed, reset, `TCP_USER_TIMEOUT`).
    TcpClosed(String),
    /// A whole message arrived.
    Received(Message),
    /// The bytes received do not decode (Events 21, 22, 28).
    Malformed(DecodeError),
    TimerExpired(Timer),
}

/// Outputs of the state machine, to be carried out in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer; report [`Event::TcpConnected`] or
    /// [`Event::TcpConnectFailed`].
    Connect,
    Send(Message),
    /// (Re)start a timer: it expires once after the duration, unless stopped or restarted.
    StartTimer(Timer, Duration),
    StopTimer(Timer),
    /// Drop the connection, or abandon the attempt under way.
    Close,
    /// Flush what was sent, half-close (shut down our sending side) and read until the
    /// peer closes or a deadline passes, so the last NOTIFICATION is not lost to a reset.
    CloseGracefully,
    /// The session reached Established.
    Established,
    /// The Established session ended; the peer no longer has our routes.
    Down {
        reason: String,
    },
}

/// Why we refuse a peer's OPEN (RFC 4271 §6.2, RFC 6286 §2.2). Each maps to the
/// NOTIFICATION sent before closing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("peer AS {received} is not the configured remote AS {expected}")]
    BadPeerAs { expected: u32, received: u32 },
    #[error("peer BGP identifier {identifier} is zero or, on an internal session, ours")]
    BadBgpIdentifier { identifier: Ipv4Addr },
    #[error("peer hold time {hold_time} s is neither 0 nor at least 3 s")]
    UnacceptableHoldTime { hold_time: u16 },
}

impl OpenError {
    pub fn notification(&self) -> Notification {
        let subcode = match self {
            Self::BadPeerAs { .. } => n::BAD_PEER_AS,
            Self::BadBgpIdentifier { .. } => n::BAD_BGP_IDENTIFIER,
            Self::UnacceptableHoldTime { .. } => n::UNACCEPTABLE_HOLD_TIME,
        };
        Notification::new(n::OPEN_MESSAGE_ERROR, subcode, Vec::new())
    }
}

/// What both OPENs settled for the current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// min(ours, peer's) in seconds; 0 means no KEEPALIVEs and no hold timer.
    pub hold_time: u16,
    /// `None` when the hold time is 0.
    pub keepalive: Option<Duration>,
    /// Four octets when the peer advertised the 4-octet AS capability.
    pub as_path: AsPathEncoding,
}

/// One peer's session: state, what was negotiated, and our routes (the Adj-RIB-Out).
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    backoff: Backoff,
    /// Set by [`Event::Stop`]: no automatic restart afterwards.
    stopped: bool,
    negotiated: Option<Negotiated>,
    /// The prefixes we should advertise.
    wanted: BTreeSet<Ipv4Net>,
    /// The prefixes the peer has from us on the Established session (Adj-RIB-Out).
    adj_rib_out: BTreeSet<Ipv4Net>,
    last_error: Option<String>,
    out: Vec<Action>,
}

impl Session {
    /// A session in Idle; `seed` seeds the retry jitter.
    pub fn new(config: SessionConfig, seed: u64) -> Self {
        Self {
            config,
            state: State::Idle,
            backoff: Backoff::new(seed),
            stopped: false,
            negotiated: None,
            wanted: BTreeSet::new(),
            adj_rib_out: BTreeSet::new(),
            last_error: None,
            out: Vec::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }

    /// Prefixes the peer currently has from us (empty unless Established).
    pub fn advertised(&self) -> &BTreeSet<Ipv4Net> {
        &self.adj_rib_out
    }

    /// The last reason a connection attempt or a session failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// True once stopped and nothing is left to do.
    pub fn is_stopped(&self) -> bool {
        self.stopped && self.state == State::Idle
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Start => self.on_start(),
            Event::Stop(communication) => self.on_stop(&communication),
            Event::TcpConnected => self.on_tcp_connected(),
            Event::TcpConnectFailed(reason) => self.on_connect_failed(&reason),
            Event::TcpClosed(reason) => self.on_tcp_closed(&reason),
            Event::Received(message) => self.on_message(message),
            Event::Malformed(error) => self.on_malformed(&error),
            Event::TimerExpired(timer) => self.on_timer(timer),
        }
        std::mem::take(&mut self.out)
    }

    /// Sets the prefixes to advertise (host bits cleared). When Established, returns the
    /// UPDATEs that withdraw what left the set and announce what joined it; otherwise the
    /// set is announced in full once the session is Established. Idempotent.
    pub fn set_advertised(&mut self, prefixes: impl IntoIterator<Item = Ipv4Net>) -> Vec<Action> {
        self.wanted = prefixes.into_iter().map(|p| p.trunc()).collect();
        self.sync_routes();
        std::mem::take(&mut self.out)
    }

    fn on_start(&mut self) {
        if self.state == State::Idle && !self.stopped {
            self.connect();
        }
    }

    fn connect(&mut self) {
        self.out.push(Action::Connect);
        self.out.push(Action::StartTimer(Timer::ConnectRetry, self.config.connect_timeout));
        self.state = State::Connect;
    }

    fn on_connect_failed(&mut self, reason: &str) {
        if self.state != State::Connect {
            return;
        }
        self.out.push(Action::StopTimer(Timer::ConnectRetry));
        // The kernel's own give-up on an unanswered SYN, as the connect timer's below.
        let hint = if reason.contains("timed out") { self.silence_hint() } else { "" };
        self.last_error = Some(format!("connect: {reason}{hint}"));
        self.retry_later(State::Active);
    }

    /// What a connect that met only silence adds to its error: with TCP-MD5, the router
    /// drops segments signed with another password without a word (RFC 2385 §3), so
    /// the password is a cause to name beside an unreachable router.
    fn silence_hint(&self) -> &'static str {
        if self.config.tcp_md5 {
            " (or the router's TCP-MD5 password differs)"
        } else {
            ""
        }
    }

    fn on_tcp_connected(&mut self) {
        if self.state != State::Connect {
            // A connection completing after a stop: not ours to use.
            self.out.push(Action::Close);
            return;
        }
        let open = Open::new(self.config.local_as, self.config.hold_time, self.config.router_id);
        self.out.push(Action::StopTimer(Timer::ConnectRetry));
        self.out.push(Action::Send(Message::Open(open)));
        self.out.push(Action::StartTimer(Timer::Hold, OPEN_WAIT_HOLD_TIME));
        self.state = State::OpenSent;
    }

    fn on_tcp_closed(&mut self, reason: &str) {
        // RFC 4271 §8.2.2: a connection lost in OpenSent goes to Active, later on to Idle.
        let next = match self.state {
            State::OpenSent => State::Active,
            State::OpenConfirm | State::Established => State::Idle,
            State::Idle | State::Connect | State::Active => return,
        };
        // A router closes on a speaker it has no neighbor for, right after its OPEN: the
        // bare "connection reset" would not say so.
        let hint = if self.state == State::OpenSent {
            " (before the router's OPEN: is this node configured as its neighbor, with this address and AS?)"
        } else {
            ""
        };
        self.drop_session(None, format!("connection closed: {reason}{hint}"), next);
    }

    fn on_timer(&mut self, timer: Timer) {
        match (timer, self.state) {
            (Timer::ConnectRetry, State::Connect) => {
                self.out.push(Action::Close);
                let (timeout, hint) = (self.config.connect_timeout, self.silence_hint());
                self.last_error = Some(format!("connect: no answer within {timeout:?}{hint}"));
                self.retry_later(State::Active);
            }
            (Timer::ConnectRetry, State::Idle | State::Active) if !self.stopped => self.connect(),
            (Timer::Hold, state) if state.connected() => {
                let notification = Notification::new(n::HOLD_TIMER_EXPIRED, n::UNSPECIFIC, Vec::new());
                self.drop_session(Some(notification), "hold timer expired".to_owned(), State::Idle);
            }
            (Timer::Keepalive, State::OpenConfirm | State::Established) => self.send_keepalive(),
            _ => {}
        }
    }

    fn on_message(&mut self, message: Message) {
        match (self.state, message) {
            (state, Message::Notification(notification)) if state.connected() => {
                // Bad Peer AS from the router: it expects another AS than the one we
                // sent, ours (the router's own AS is what our configuration names).
                let hint = if (notification.code, notification.subcode) == (n::OPEN_MESSAGE_ERROR, n::BAD_PEER_AS) {
                    format!(
                        " (the router expects another AS than ours, {}: check --bgp-local-as)",
                        self.config.local_as
                    )
                } else {
                    String::new()
                };
                self.drop_session(None, format!("NOTIFICATION received {notification}{hint}"), State::Idle);
            }
            (State::OpenSent, Message::Open(open)) => self.on_open(&open),
            (State::OpenConfirm, Message::Keepalive) => self.on_established(),
            // RFC 4271 §8.2.2: KEEPALIVE and UPDATE restart the hold timer; an UPDATE
            // from the router is of no use to an announce-only speaker and is dropped.
            (State::Established, Message::Keepalive | Message::Update(_)) => self.restart_hold_timer(),
            (state, message) if state.connected() => self.unexpected(state, &message),
            // Bytes still arriving on a connection we are leaving.
            _ => {}
        }
    }

    fn on_malformed(&mut self, error: &DecodeError) {
        if self.state.connected() {
            let notification = error.notification();
            let reason = format!("malformed message ({error}); NOTIFICATION sent {notification}");
            self.drop_session(Some(notification), reason, State::Idle);
        }
    }

    fn on_open(&mut self, open: &Open) {
        let negotiated = match self.accept_open(open) {
            Ok(negotiated) => negotiated,
            Err(error) => {
                let notification = error.notification();
                let reason = format!("OPEN refused ({error}); NOTIFICATION sent {notification}");
                return self.drop_session(Some(notification), reason, State::Idle);
            }
        };
        self.out.push(Action::Send(Message::Keepalive));
        match negotiated.keepalive {
            Some(keepalive) => {
                self.out.push(Action::StartTimer(Timer::Hold, Duration::from_secs(negotiated.hold_time.into())));
                self.out.push(Action::StartTimer(Timer::Keepalive, keepalive));
            }
            None => self.out.push(Action::StopTimer(Timer::Hold)),
        }
        self.negotiated = Some(negotiated);
        self.state = State::OpenConfirm;
    }

    /// Checks the peer's OPEN against the configuration and settles the hold time,
    /// keepalive interval and AS_PATH encoding.
    fn accept_open(&self, open: &Open) -> Result<Negotiated, OpenError> {
        let peer_as = open.peer_as();
        if peer_as != self.config.remote_as {
            return Err(OpenError::BadPeerAs { expected: self.config.remote_as, received: peer_as });
        }
        // RFC 6286 §2.2: zero is never valid; our own identifier only on an internal
        // session (on an external one, two ASes may well reuse an identifier).
        let internal = self.config.remote_as == self.config.local_as;
        let identifier = open.bgp_identifier;
        if identifier.is_unspecified() || (internal && identifier == self.config.router_id) {
            return Err(OpenError::BadBgpIdentifier { identifier });
        }
        // RFC 4271 §4.2: the hold time must be zero or at least three seconds.
        if matches!(open.hold_time, 1 | 2) {
            return Err(OpenError::UnacceptableHoldTime { hold_time: open.hold_time });
        }
        let hold_time = open.hold_time.min(self.config.hold_time);
        let keepalive = (hold_time != 0).then(|| self.config.keepalive.min(Duration::from_secs(hold_time.into()) / 3));
        let as_path = match open.four_octet_as() {
            Some(_) => AsPathEncoding::FourOctet,
            None => AsPathEncoding::TwoOctet,
        };
        Ok(Negotiated { hold_time, keepalive, as_path })
    }

    fn on_established(&mut self) {
        self.restart_hold_timer();
        self.state = State::Established;
        self.backoff.reset();
        self.out.push(Action::Established);
        self.adj_rib_out.clear();
        self.sync_routes();
    }

    /// FSM Error (RFC 6608): a message this state does not expect.
    fn unexpected(&mut self, state: State, message: &Message) {
        let subcode = match state {
            State::OpenSent => n::UNEXPECTED_MESSAGE_IN_OPEN_SENT,
            State::OpenConfirm => n::UNEXPECTED_MESSAGE_IN_OPEN_CONFIRM,
            _ => n::UNEXPECTED_MESSAGE_IN_ESTABLISHED,
        };
        let notification = Notification::new(n::FSM_ERROR, subcode, Vec::new());
        let reason = format!("unexpected {:?} in {state}; NOTIFICATION sent {notification}", message.message_type());
        self.drop_session(Some(notification), reason, State::Idle);
    }

    fn on_stop(&mut self, communication: &ShutdownCommunication) {
        self.stopped = true;
        match self.state {
            State::Established | State::OpenSent | State::OpenConfirm => {
                let withdrawn: Vec<Ipv4Net> = self.adj_rib_out.iter().copied().collect();
                self.out.extend(Update::withdraw(&withdrawn).into_iter().map(|u| Action::Send(Message::Update(u))));
                let cease = Notification::administrative_shutdown(communication);
                self.out.push(Action::Send(Message::Notification(cease)));
                self.out.push(Action::CloseGracefully);
            }
            State::Connect => self.out.push(Action::Close),
            State::Idle | State::Active => {}
        }
        if self.state == State::Established {
            self.out.push(Action::Down { reason: "administrative shutdown".to_owned() });
        }
        self.out.extend([Timer::ConnectRetry, Timer::Hold, Timer::Keepalive].map(Action::StopTimer));
        self.adj_rib_out.clear();
        self.negotiated = None;
        self.state = State::Idle;
    }

    /// Ends the connection: sends `notification` if any (then closes gracefully so it
    /// reaches the peer), forgets what was negotiated and advertised, and waits a backoff
    /// delay in `next` before the next attempt.
    fn drop_session(&mut self, notification: Option<Notification>, reason: String, next: State) {
        match notification {
            Some(notification) => {
                self.out.push(Action::Send(Message::Notification(notification)));
                self.out.push(Action::CloseGracefully);
            }
            None => self.out.push(Action::Close),
        }
        self.out.push(Action::StopTimer(Timer::Hold));
        self.out.push(Action::StopTimer(Timer::Keepalive));
        if self.state == State::Established {
            self.out.push(Action::Down { reason: reason.clone() });
        }
        self.adj_rib_out.clear();
        self.negotiated = None;
        self.last_error = Some(reason);
        self.retry_later(next);
    }

    fn retry_later(&mut self, state: State) {
        self.state = state;
        if !self.stopped {
            self.out.push(Action::StartTimer(Timer::ConnectRetry, self.backoff.next_delay()));
        }
    }

    /// When Established, sends UPDATEs so the peer has exactly `wanted`: withdrawals
    /// first, then announcements.
    fn sync_routes(&mut self) {
        let Some(negotiated) = self.negotiated.filter(|_| self.state == State::Established) else { return };
        let withdrawn: Vec<Ipv4Net> = self.adj_rib_out.difference(&self.wanted).copied().collect();
        let announced: Vec<Ipv4Net> = self.wanted.difference(&self.adj_rib_out).copied().collect();
        let config = &self.config;
        let updates = Update::withdraw(&withdrawn).into_iter().chain(Update::announce(
            &announced,
            config.local_as,
            config.next_hop,
            negotiated.as_path,
        ));
        let before = self.out.len();
        self.out.extend(updates.map(|u| Action::Send(Message::Update(u))));
        self.adj_rib_out.clone_from(&self.wanted);
        // RFC 4271 §4.4: sending an UPDATE restarts the keepalive timer.
        if let (true, Some(keepalive)) = (self.out.len() > before, negotiated.keepalive) {
            self.out.push(Action::StartTimer(Timer::Keepalive, keepalive));
        }
    }

    fn send_keepalive(&mut self) {
        self.out.push(Action::Send(Message::Keepalive));
        if let Some(keepalive) = self.negotiated.and_then(|n| n.keepalive) {
            self.out.push(Action::StartTimer(Timer::Keepalive, keepalive));
        }
    }

    fn restart_hold_timer(&mut self) {
        if let Some(n) = self.negotiated.filter(|n| n.hold_time != 0) {
            self.out.push(Action::StartTimer(Timer::Hold, Duration::from_secs(n.hold_time.into())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Capability;

    const ROUTER_ID: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
    const PEER_ID: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
    const NEXT_HOP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

    fn config() -> SessionConfig {
        SessionConfig {
            local_as: 65000,
            remote_as: 65001,
            router_id: ROUTER_ID,
            hold_time: 9,
            keepalive: Duration::from_secs(3),
            next_hop: NEXT_HOP,
            connect_timeout: Duration::from_secs(5),
            tcp_md5: false,
        }
    }

    fn vip(last: u8) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(192, 0, 2, last), 32).unwrap()
    }

    fn peer_open(asn: u32, hold_time: u16) -> Message {
        Message::Open(Open::new(asn, hold_time, PEER_ID))
    }

    fn in_open_sent(config: SessionConfig) -> Session {
        let mut session = Session::new(config, 1);
        session.handle(Event::Start);
        session.handle(Event::TcpConnected);
        session
    }

    fn established(config: SessionConfig) -> Session {
        let mut session = in_open_sent(config);
        session.handle(Event::Received(peer_open(65001, 9)));
        session.handle(Event::Received(Message::Keepalive));
        assert_eq!(session.state(), State::Established);
        session
    }

    fn sent(actions: &[Action]) -> Vec<&Message> {
        actions.iter().filter_map(|a| if let Action::Send(m) = a { Some(m) } else { None }).collect()
    }

    fn notification_sent(actions: &[Action]) -> Option<(u8, u8)> {
        sent(actions).into_iter().find_map(|m| match m {
            Message::Notification(n) => Some((n.code, n.subcode)),
            _ => None,
        })
    }

    fn retry_delay(actions: &[Action]) -> Option<Duration> {
        actions.iter().find_map(|a| match a {
            Action::StartTimer(Timer::ConnectRetry, d) => Some(*d),
            _ => None,
        })
    }

    fn announced(actions: &[Action]) -> Vec<Ipv4Net> {
        sent(actions).iter().flat_map(|m| if let Message::Update(u) = m { u.nlri.clone() } else { vec![] }).collect()
    }

    fn withdrawn(actions: &[Action]) -> Vec<Ipv4Net> {
        sent(actions)
            .iter()
            .flat_map(|m| if let Message::Update(u) = m { u.withdrawn_routes.clone() } else { vec![] })
            .collect()
    }

    #[test]
    fn start_connects_and_bounds_the_attempt_with_the_connect_timeout() {
        let mut session = Session::new(config(), 1);
        let actions = session.handle(Event::Start);
        assert_eq!(actions, vec![Action::Connect, Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5))]);
        assert_eq!(session.state(), State::Connect);
    }

    #[test]
    fn a_refused_connection_waits_a_backoff_in_active_then_connects_again() {
        let mut session = Session::new(config(), 1);
        session.handle(Event::Start);
        let actions = session.handle(Event::TcpConnectFailed("connection refused".into()));
        assert_eq!(session.state(), State::Active);
        assert_eq!(session.last_error(), Some("connect: connection refused"));
        let delay = retry_delay(&actions).unwrap();
        assert!(delay >= Duration::from_millis(800) && delay <= Duration::from_millis(1200), "{delay:?}");
        assert_eq!(session.handle(Event::TimerExpired(Timer::ConnectRetry))[0], Action::Connect);
        assert_eq!(session.state(), State::Connect);
        // The second failure waits about twice as long.
        let second = retry_delay(&session.handle(Event::TcpConnectFailed("refused".into()))).unwrap();
        assert!(second >= Duration::from_millis(1600) && second <= Duration::from_millis(2400), "{second:?}");
    }

    #[test]
    fn an_attempt_without_answer_is_abandoned_when_the_connect_timeout_expires() {
        let mut session = Session::new(config(), 1);
        session.handle(Event::Start);
        let actions = session.handle(Event::TimerExpired(Timer::ConnectRetry));
        assert_eq!(actions[0], Action::Close);
        assert!(retry_delay(&actions).is_some());
        assert_eq!(session.state(), State::Active);
        assert_eq!(session.last_error(), Some("connect: no answer within 5s"));
        // Signed, the same silence may be a password the router does not share.
        let mut signed = Session::new(SessionConfig { tcp_md5: true, ..config() }, 1);
        signed.handle(Event::Start);
        signed.handle(Event::TimerExpired(Timer::ConnectRetry));
        assert_eq!(
            signed.last_error(),
            Some("connect: no answer within 5s (or the router's TCP-MD5 password differs)")
        );
        // The kernel's own timeout says the same; a refusal is an answer.
        signed.handle(Event::TimerExpired(Timer::ConnectRetry));
        signed.handle(Event::TcpConnectFailed("connection timed out".into()));
        assert_eq!(
            signed.last_error(),
            Some("connect: connection timed out (or the router's TCP-MD5 password differs)")
        );
        signed.handle(Event::TimerExpired(Timer::ConnectRetry));
        signed.handle(Event::TcpConnectFailed("connection refused".into()));
        assert_eq!(signed.last_error(), Some("connect: connection refused"));
    }

    #[test]
    fn a_connection_sends_our_open_and_waits_four_minutes_for_the_peers() {
        let mut session = Session::new(config(), 1);
        session.handle(Event::Start);
        let actions = session.handle(Event::TcpConnected);
        assert_eq!(
            actions,
            vec![
                Action::StopTimer(Timer::ConnectRetry),
                Action::Send(Message::Open(Open::new(65000, 9, ROUTER_ID))),
                Action::StartTimer(Timer::Hold, Duration::from_secs(240)),
            ]
        );
        assert_eq!(session.state(), State::OpenSent);
    }

    #[test]
    fn an_acceptable_open_is_answered_with_keepalive_and_the_smaller_hold_time() {
        let mut session = in_open_sent(config());
        let actions = session.handle(Event::Received(peer_open(65001, 30)));
        assert_eq!(
            actions,
            vec![
                Action::Send(Message::Keepalive),
                Action::StartTimer(Timer::Hold, Duration::from_secs(9)),
                Action::StartTimer(Timer::Keepalive, Duration::from_secs(3)),
            ]
        );
        assert_eq!(session.state(), State::OpenConfirm);
        assert_eq!(session.negotiated().unwrap().hold_time, 9);
    }

    #[test]
    fn a_hold_time_of_two_seconds_is_refused_with_unacceptable_hold_time() {
        for hold_time in [1, 2] {
            let mut session = in_open_sent(config());
            let actions = session.handle(Event::Received(peer_open(65001, hold_time)));
            assert_eq!(notification_sent(&actions), Some((2, 6)));
            assert!(actions.contains(&Action::CloseGracefully));
            assert_eq!(session.state(), State::Idle);
            assert!(session.last_error().unwrap().contains("Unacceptable Hold Time"), "{:?}", session.last_error());
            assert!(retry_delay(&actions).is_some());
        }
    }

    #[test]
    fn a_peer_hold_time_of_three_seconds_gives_one_second_keepalives() {
        let mut session = in_open_sent(config());
        let actions = session.handle(Event::Received(peer_open(65001, 3)));
        assert!(actions.contains(&Action::StartTimer(Timer::Hold, Duration::from_secs(3))));
        assert!(actions.contains(&Action::StartTimer(Timer::Keepalive, Duration::from_secs(1))));
    }

    #[test]
    fn a_configured_keepalive_below_a_third_of_the_hold_time_is_kept() {
        let mut session = in_open_sent(SessionConfig { keepalive: Duration::from_millis(500), ..config() });
        let actions = session.handle(Event::Received(peer_open(65001, 9)));
        assert!(actions.contains(&Action::StartTimer(Timer::Keepalive, Duration::from_millis(500))));
    }

    #[test]
    fn a_hold_time_of_zero_means_no_keepalives_and_no_hold_timer() {
        let mut session = in_open_sent(config());
        let actions = session.handle(Event::Received(peer_open(65001, 0)));
        assert_eq!(actions, vec![Action::Send(Message::Keepalive), Action::StopTimer(Timer::Hold)]);
        let actions = session.handle(Event::Received(Message::Keepalive));
        assert_eq!(actions, vec![Action::Established]);
        assert!(session.handle(Event::Received(Message::Keepalive)).is_empty());
    }

    #[test]
    fn a_peer_with_another_as_is_refused_with_bad_peer_as() {
        let mut session = in_open_sent(config());
        let actions = session.handle(Event::Received(peer_open(65002, 9)));
        assert_eq!(notification_sent(&actions), Some((2, 2)));
        assert_eq!(session.state(), State::Idle);
    }

    #[test]
    fn a_four_octet_as_is_taken_from_the_capability_not_the_as_trans_field() {
        let mut session = in_open_sent(SessionConfig { remote_as: 4_200_000_001, ..config() });
        session.handle(Event::Received(peer_open(4_200_000_001, 9)));
        assert_eq!(session.state(), State::OpenConfirm);
    }

    #[test]
    fn a_zero_bgp_identifier_is_refused_with_bad_bgp_identifier() {
        let mut session = in_open_sent(config());
        let actions = session.handle(Event::Received(Message::Open(Open::new(65001, 9, Ipv4Addr::UNSPECIFIED))));
        assert_eq!(notification_sent(&actions), Some((2, 3)));
    }

    #[test]
    fn our_own_bgp_identifier_is_refused_on_an_internal_session_only() {
        let internal = SessionConfig { remote_as: 65000, ..config() };
        let mut session = in_open_sent(internal);
        let actions = session.handle(Event::Received(Message::Open(Open::new(65000, 9, ROUTER_ID))));
        assert_eq!(notification_sent(&actions), Some((2, 3)));

        let mut session = in_open_sent(config());
        session.handle(Event::Received(Message::Open(Open::new(65001, 9, ROUTER_ID))));
        assert_eq!(session.state(), State::OpenConfirm);
    }

    #[test]
    fn keepalive_in_open_confirm_establishes_and_announces_the_whole_set() {
        let mut session = in_open_sent(config());
        session.set_advertised([vip(10), vip(11)]);
        session.handle(Event::Received(peer_open(65001, 9)));
        let actions = session.handle(Event::Received(Message::Keepalive));
        assert_eq!(actions[0], Action::StartTimer(Timer::Hold, Duration::from_secs(9)));
        assert_eq!(actions[1], Action::Established);
        assert_eq!(announced(&actions), vec![vip(10), vip(11)]);
        let Some(Message::Update(update)) = sent(&actions).first().copied() else { panic!("no UPDATE") };
        assert_eq!(update, &Update::announce(&[vip(10), vip(11)], 65000, NEXT_HOP, AsPathEncoding::FourOctet)[0]);
        assert_eq!(actions.last(), Some(&Action::StartTimer(Timer::Keepalive, Duration::from_secs(3))));
        assert_eq!(session.advertised().len(), 2);
    }

    #[test]
    fn a_peer_without_the_four_octet_as_capability_gets_a_two_octet_as_path() {
        let mut session = in_open_sent(config());
        session.set_advertised([vip(10)]);
        let mut open = Open::new(65001, 9, PEER_ID);
        open.capabilities.retain(|c| !matches!(c, Capability::FourOctetAs { .. }));
        session.handle(Event::Received(Message::Open(open)));
        let actions = session.handle(Event::Received(Message::Keepalive));
        let Some(Message::Update(update)) = sent(&actions).first().copied() else { panic!("no UPDATE") };
        assert_eq!(update, &Update::announce(&[vip(10)], 65000, NEXT_HOP, AsPathEncoding::TwoOctet)[0]);
    }

    #[test]
    fn set_advertised_sends_only_the_difference_and_is_idempotent() {
        let mut session = established(config());
        let actions = session.set_advertised([vip(10), vip(11)]);
        assert_eq!((announced(&actions), withdrawn(&actions)), (vec![vip(10), vip(11)], vec![]));
        assert!(session.set_advertised([vip(11), vip(10)]).is_empty());
        let actions = session.set_advertised([vip(11), vip(12)]);
        assert_eq!((announced(&actions), withdrawn(&actions)), (vec![vip(12)], vec![vip(10)]));
        let actions = session.set_advertised([]);
        assert_eq!((announced(&actions), withdrawn(&actions)), (vec![], vec![vip(11), vip(12)]));
        assert!(session.advertised().is_empty());
    }

    #[test]
    fn nothing_is_sent_before_established() {
        let mut session = in_open_sent(config());
        assert!(session.set_advertised([vip(10)]).is_empty());
        assert!(session.advertised().is_empty());
    }

    #[test]
    fn keepalive_timer_sends_a_keepalive_and_restarts() {
        let mut session = established(config());
        let actions = session.handle(Event::TimerExpired(Timer::Keepalive));
        assert_eq!(
            actions,
            vec![Action::Send(Message::Keepalive), Action::StartTimer(Timer::Keepalive, Duration::from_secs(3))]
        );
    }

    #[test]
    fn keepalive_and_update_from_the_peer_restart_the_hold_timer() {
        let mut session = established(config());
        let restart = vec![Action::StartTimer(Timer::Hold, Duration::from_secs(9))];
        assert_eq!(session.handle(Event::Received(Message::Keepalive)), restart);
        assert_eq!(session.handle(Event::Received(Message::Update(Update::default()))), restart);
    }

    #[test]
    fn hold_timer_expiry_sends_hold_timer_expired_and_retries_after_a_backoff() {
        let mut session = established(config());
        session.set_advertised([vip(10)]);
        let actions = session.handle(Event::TimerExpired(Timer::Hold));
        assert_eq!(notification_sent(&actions), Some((4, 0)));
        assert!(actions.contains(&Action::Down { reason: "hold timer expired".into() }));
        assert_eq!(session.state(), State::Idle);
        assert!(session.advertised().is_empty());
        // Established reset the backoff: the retry comes after about a second.
        let delay = retry_delay(&actions).unwrap();
        assert!(delay <= Duration::from_millis(1200), "{delay:?}");
        assert_eq!(session.handle(Event::TimerExpired(Timer::ConnectRetry))[0], Action::Connect);
    }

    #[test]
    fn a_received_notification_ends_the_session_without_answering() {
        let mut session = established(config());
        let cease = Notification::administrative_shutdown(&ShutdownCommunication::new("maintenance"));
        let actions = session.handle(Event::Received(Message::Notification(cease)));
        assert_eq!(notification_sent(&actions), None);
        assert_eq!(actions[0], Action::Close);
        assert_eq!(session.state(), State::Idle);
        assert_eq!(
            session.last_error(),
            Some("NOTIFICATION received 6/2 (Cease, Administrative Shutdown) \"maintenance\"")
        );
    }

    /// Bad Peer AS from the router names the AS we sent: the one to check.
    #[test]
    fn a_bad_peer_as_from_the_router_names_our_as() {
        let mut session = in_open_sent(config());
        let bad_peer_as = Notification::new(n::OPEN_MESSAGE_ERROR, n::BAD_PEER_AS, Vec::new());
        session.handle(Event::Received(Message::Notification(bad_peer_as)));
        let error = session.last_error().unwrap_or_default();
        assert!(error.ends_with("(the router expects another AS than ours, 65000: check --bgp-local-as)"), "{error}");
    }

    #[test]
    fn a_connection_lost_in_open_sent_goes_to_active_and_later_to_idle() {
        let mut session = in_open_sent(config());
        session.handle(Event::TcpClosed("reset by peer".into()));
        assert_eq!(session.state(), State::Active);
        let error = session.last_error().unwrap_or_default();
        assert!(error.ends_with("is this node configured as its neighbor, with this address and AS?)"), "{error}");
        let mut session = established(config());
        let actions = session.handle(Event::TcpClosed("reset by peer".into()));
        assert_eq!(session.state(), State::Idle);
        assert!(actions.contains(&Action::Down { reason: "connection closed: reset by peer".into() }));
    }

    #[test]
    fn an_unexpected_message_is_a_finite_state_machine_error_naming_the_state() {
        let mut session = in_open_sent(config());
        assert_eq!(notification_sent(&session.handle(Event::Received(Message::Keepalive))), Some((5, 1)));
        let mut session = in_open_sent(config());
        session.handle(Event::Received(peer_open(65001, 9)));
        assert_eq!(notification_sent(&session.handle(Event::Received(peer_open(65001, 9)))), Some((5, 2)));
        let mut session = established(config());
        assert_eq!(notification_sent(&session.handle(Event::Received(peer_open(65001, 9)))), Some((5, 3)));
    }

    #[test]
    fn a_malformed_message_is_answered_with_its_notification() {
        let mut session = established(config());
        let actions = session.handle(Event::Malformed(DecodeError::BadType { message_type: 5 }));
        assert_eq!(notification_sent(&actions), Some((1, 3)));
        assert!(actions.contains(&Action::CloseGracefully));
    }

    #[test]
    fn stop_when_established_withdraws_then_sends_cease_and_half_closes() {
        let mut session = established(config());
        session.set_advertised([vip(10)]);
        let actions = session.handle(Event::Stop(ShutdownCommunication::new("bye")));
        let messages = sent(&actions);
        assert_eq!(messages[0], &Message::Update(Update::withdraw(&[vip(10)]).remove(0)));
        assert_eq!(
            messages[1],
            &Message::Notification(Notification::administrative_shutdown(&ShutdownCommunication::new("bye")))
        );
        assert_eq!(actions[2], Action::CloseGracefully);
        assert!(retry_delay(&actions).is_none());
        assert!(session.is_stopped());
        // Nothing restarts it.
        assert!(session.handle(Event::Start).is_empty());
        assert!(session.handle(Event::TimerExpired(Timer::ConnectRetry)).is_empty());
        assert!(session.set_advertised([vip(11)]).is_empty());
    }

    #[test]
    fn stop_while_connecting_abandons_the_attempt() {
        let mut session = Session::new(config(), 1);
        session.handle(Event::Start);
        let actions = session.handle(Event::Stop(ShutdownCommunication::default()));
        assert_eq!(actions[0], Action::Close);
        assert!(session.is_stopped());
        assert_eq!(session.handle(Event::TcpConnected), vec![Action::Close]);
    }
}
