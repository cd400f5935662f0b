//! The task driving one peer's [`Session`]: it turns the session's actions into a TCP
//! connection, writes and timers, and feeds back connection results, received messages,
//! timer expiries, the advertised set and the shutdown request as events.
//!
//! Generic over the [`Connector`] so that tests can run it over in-memory streams with
//! paused time.

use std::{collections::BTreeSet, future::Future, io, pin::Pin, time::Duration};

use ipnet::Ipv4Net;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::{sleep_until, timeout, timeout_at, Instant},
};
use tracing::{debug, info, warn};

use crate::codec::{self, Message, ShutdownCommunication, MAX_MESSAGE_LEN};
use crate::session::{Action, Event, Session, State, Timer};

use super::status::PeerSnapshot;

/// Longest we wait for a write to be taken by the socket. Our messages are small, so a
/// send buffer full for this long means the peer stopped reading; with the default 9 s
/// hold time its session would have expired anyway.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for the peer to close after a NOTIFICATION sent on an error (a
/// shutdown uses its own deadline): enough for the NOTIFICATION to arrive, short enough
/// not to delay the next attempt.
const ERROR_DRAIN: Duration = Duration::from_secs(1);

/// Opens connections to one peer.
pub trait Connector: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// One connection attempt; the error is the reason shown in status.
    fn connect(&self) -> impl Future<Output = Result<Self::Stream, String>> + Send + 'static;
}

type Connecting<S> = Pin<Box<dyn Future<Output = Result<S, String>> + Send>>;

/// A shutdown request: leave with this communication, drain until `deadline`.
#[derive(Clone, Debug)]
pub struct ShutdownRequest {
    pub deadline: Instant,
    pub communication: ShutdownCommunication,
}

/// Deadlines of the session's three timers.
#[derive(Debug, Default)]
struct Timers {
    connect_retry: Option<Instant>,
    hold: Option<Instant>,
    keepalive: Option<Instant>,
}

impl Timers {
    fn slot(&mut self, timer: Timer) -> &mut Option<Instant> {
        match timer {
            Timer::ConnectRetry => &mut self.connect_retry,
            Timer::Hold => &mut self.hold,
            Timer::Keepalive => &mut self.keepalive,
        }
    }

    /// The timer due first.
    fn next(&self) -> Option<(Timer, Instant)> {
        [(Timer::ConnectRetry, self.connect_retry), (Timer::Hold, self.hold), (Timer::Keepalive, self.keepalive)]
            .into_iter()
            .filter_map(|(timer, at)| Some((timer, at?)))
            .min_by_key(|&(_, at)| at)
    }
}

/// An open connection and the bytes read from it not yet decoded.
struct Connection<S> {
    stream: S,
    received: Vec<u8>,
}

/// What woke the task up.
enum Input<S> {
    Stop(ShutdownCommunication),
    Routes(BTreeSet<Ipv4Net>),
    Connected(Result<S, String>),
    Read(io::Result<usize>),
    Timer(Timer),
}

/// One peer's task state.
pub struct PeerTask<C: Connector> {
    connector: C,
    session: Session,
    timers: Timers,
    connecting: Option<Connecting<C::Stream>>,
    connection: Option<Connection<C::Stream>>,
    routes: watch::Receiver<BTreeSet<Ipv4Net>>,
    routes_open: bool,
    shutdown: watch::Receiver<Option<ShutdownRequest>>,
    /// Deadline of the shutdown under way, if any.
    stopping: Option<Instant>,
    status: watch::Sender<PeerSnapshot>,
    scratch: Box<[u8; MAX_MESSAGE_LEN]>,
}

impl<C: Connector> PeerTask<C> {
    pub fn new(
        connector: C,
        session: Session,
        routes: watch::Receiver<BTreeSet<Ipv4Net>>,
        shutdown: watch::Receiver<Option<ShutdownRequest>>,
        status: watch::Sender<PeerSnapshot>,
    ) -> Self {
        Self {
            connector,
            session,
            timers: Timers::default(),
            connecting: None,
            connection: None,
            routes,
            routes_open: true,
            shutdown,
            stopping: None,
            status,
            scratch: Box::new([0; MAX_MESSAGE_LEN]),
        }
    }

    /// Runs until stopped (shutdown request, or the handle dropped).
    pub async fn run(mut self) {
        let initial = self.routes.borrow_and_update().clone();
        let actions = self.session.set_advertised(initial);
        self.execute_all(actions).await;
        self.apply(Event::Start).await;
        while !(self.session.is_stopped() && self.connection.is_none()) {
            match self.next_input().await {
                Input::Stop(communication) => self.apply(Event::Stop(communication)).await,
                Input::Routes(routes) => {
                    let actions = self.session.set_advertised(routes);
                    self.execute_all(actions).await;
                }
                Input::Connected(Ok(stream)) => {
                    self.connection = Some(Connection { stream, received: Vec::new() });
                    self.apply(Event::TcpConnected).await;
                }
                Input::Connected(Err(reason)) => self.apply(Event::TcpConnectFailed(reason)).await,
                Input::Read(result) => self.on_read(result).await,
                Input::Timer(timer) => {
                    *self.timers.slot(timer) = None;
                    self.apply(Event::TimerExpired(timer)).await;
                }
            }
        }
        self.publish();
        debug!("peer task finished");
    }

    async fn next_input(&mut self) -> Input<C::Stream> {
        let next_timer = self.timers.next();
        tokio::select! {
            changed = self.shutdown.changed(), if self.stopping.is_none() => {
                // The handle gone (Err) is a stop without drain time.
                let request = changed.ok().and_then(|()| self.shutdown.borrow_and_update().clone());
                let (deadline, communication) = match request {
                    Some(r) => (r.deadline, r.communication),
                    None => (Instant::now(), ShutdownCommunication::default()),
                };
                self.stopping = Some(deadline);
                Input::Stop(communication)
            }
            changed = self.routes.changed(), if self.routes_open => match changed {
                Ok(()) => Input::Routes(self.routes.borrow_and_update().clone()),
                Err(_) => {
                    self.routes_open = false;
                    Input::Routes(self.routes.borrow().clone())
                }
            },
            result = finish_connect(self.connecting.as_mut()) => {
                self.connecting = None;
                Input::Connected(result)
            }
            result = read_some(self.connection.as_mut(), &mut self.scratch[..]) => Input::Read(result),
            timer = expire(next_timer) => Input::Timer(timer),
        }
    }

    /// The connection was read: the end of it, or bytes.
    async fn on_read(&mut self, result: io::Result<usize>) {
        let reason = match result {
            Ok(0) => "closed by peer".to_owned(),
            Ok(n) => return self.on_bytes(n).await,
            Err(err) => err.to_string(),
        };
        // Gone whatever the session makes of it, so a closed socket is never polled again.
        self.connection = None;
        self.apply(Event::TcpClosed(reason)).await;
    }

    /// `n` bytes arrived in `scratch`: decode every whole message and feed each in, until
    /// the session drops the connection.
    async fn on_bytes(&mut self, n: usize) {
        let Some(connection) = self.connection.as_mut() else { return };
        connection.received.extend_from_slice(&self.scratch[..n]);
        while let Some(connection) = self.connection.as_mut() {
            let event = match codec::decode(&connection.received) {
                Ok(None) => return,
                Ok(Some((message, used))) => {
                    connection.received.drain(..used);
                    self.status.send_modify(|s| s.status.messages_received += 1);
                    debug!(message = ?message.message_type(), "received");
                    Event::Received(message)
                }
                Err(error) => {
                    connection.received.clear();
                    Event::Malformed(error)
                }
            };
            self.apply(event).await;
        }
    }

    /// Feeds an event and carries out the actions, and the events they cause in turn.
    async fn apply(&mut self, event: Event) {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let (before, error_before) = (self.session.state(), self.session.last_error().map(str::to_owned));
            let actions = self.session.handle(event);
            next = self.execute(actions).await;
            let after = self.session.state();
            if before != after {
                info!(from = %before, to = %after, "BGP state change");
            }
            // A new reason is worth a warning; the same one again (a router down for a
            // while, retried every few seconds) only shows in the state changes.
            match self.session.last_error() {
                Some(error) if error_before.as_deref() != Some(error) => warn!(%error, "BGP peer error"),
                _ => {}
            }
        }
        self.publish();
    }

    async fn execute_all(&mut self, actions: Vec<Action>) {
        if let Some(event) = self.execute(actions).await {
            self.apply(event).await;
        }
        self.publish();
    }

    /// Carries out actions in order. A failed write ends the connection: the rest of the
    /// sends are skipped and the loss is returned as the next event.
    async fn execute(&mut self, actions: Vec<Action>) -> Option<Event> {
        let mut lost: Option<String> = None;
        for action in actions {
            match action {
                Action::Connect => self.connecting = Some(Box::pin(self.connector.connect())),
                Action::Send(message) if lost.is_none() => lost = self.send(&message).await.err(),
                Action::Send(_) => {}
                Action::StartTimer(timer, after) => *self.timers.slot(timer) = Some(Instant::now() + after),
                Action::StopTimer(timer) => *self.timers.slot(timer) = None,
                Action::Close => {
                    self.connecting = None;
                    self.connection = None;
                }
                Action::CloseGracefully => self.close_gracefully().await,
                Action::Established => {
                    let hold_time = self.session.negotiated().map(|n| n.hold_time);
                    info!(hold_time, "BGP session established");
                    self.status.send_modify(|s| s.established_at = Some(Instant::now()));
                }
                Action::Down { reason } => {
                    warn!(%reason, "BGP session down");
                    self.status.send_modify(|s| s.established_at = None);
                }
            }
        }
        let reason = lost?;
        self.connection = None;
        Some(Event::TcpClosed(reason))
    }

    async fn send(&mut self, message: &Message) -> Result<(), String> {
        let Some(connection) = self.connection.as_mut() else { return Err("not connected".to_owned()) };
        let bytes = codec::encode(message).map_err(|e| e.to_string())?;
        match timeout(SEND_TIMEOUT, connection.stream.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(format!("write: {err}")),
            Err(_) => return Err(format!("write: blocked for {SEND_TIMEOUT:?}")),
        }
        self.status.send_modify(|s| s.status.messages_sent += 1);
        match message {
            Message::Notification(notification) => info!(%notification, "NOTIFICATION sent"),
            other => debug!(message = ?other.message_type(), "sent"),
        }
        Ok(())
    }

    /// Half-closes and reads until the peer closes or the deadline passes: our last
    /// NOTIFICATION reaches the peer instead of being cut off by a reset.
    async fn close_gracefully(&mut self) {
        let Some(mut connection) = self.connection.take() else { return };
        let deadline = self.stopping.unwrap_or_else(|| Instant::now() + ERROR_DRAIN);
        let drained = timeout_at(deadline, async {
            connection.stream.flush().await?;
            connection.stream.shutdown().await?;
            while connection.stream.read(&mut self.scratch[..]).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
        match drained {
            Ok(Ok(())) => debug!("peer closed the connection"),
            Ok(Err(err)) => debug!(%err, "connection ended while draining"),
            Err(_) => debug!("peer did not close before the deadline"),
        }
    }

    fn publish(&self) {
        let session = &self.session;
        self.status.send_modify(|s| {
            s.status.state = session.state();
            s.status.last_error = session.last_error().map(str::to_owned);
            s.status.hold_time = session.negotiated().map(|n| n.hold_time);
            s.status.advertised = session.advertised().iter().copied().collect();
            if session.state() != State::Established {
                s.established_at = None;
            }
        });
    }
}

async fn finish_connect<S>(connecting: Option<&mut Connecting<S>>) -> Result<S, String> {
    match connecting {
        Some(connecting) => connecting.await,
        None => std::future::pending().await,
    }
}

async fn read_some<S: AsyncRead + Unpin>(connection: Option<&mut Connection<S>>, buf: &mut [u8]) -> io::Result<usize> {
    match connection {
        Some(connection) => connection.stream.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn expire(next: Option<(Timer, Instant)>) -> Timer {
    match next {
        Some((timer, at)) => {
            sleep_until(at).await;
            timer
        }
        None => std::future::pending().await,
    }
}
