//! Limits on the connections both listeners hold: how many at once, and how long one may
//! sit without sending or receiving.
//!
//! Every connection holds a file descriptor and a task; without limits, a few hundred idle
//! or half-sent connections exhaust the descriptors, and ingest and checkpoints (which open
//! files too) stall. So each listener admits at most `max` connections and refuses the next
//! at once — Postgres's `53300 sorry, too many clients already`, HTTP `503` — and a
//! connection that makes no progress for its listener's timeout is closed: a Postgres client
//! that does not finish its startup, an HTTP client that sends half a request or holds an
//! idle keep-alive connection. Refusals and timeouts are counted (`GET /health`).
//!
//! Why a wrapper around the socket rather than a library setting: `axum::serve` does not
//! expose hyper's connection builder (so neither its `header_read_timeout` nor a keep-alive
//! idle limit), tower's timeout layers bound a request's handling, not a connection that never
//! completes a request, and pgwire's `process_socket` takes a plain `TcpStream`, so the
//! Postgres side watches the startup from its handler instead.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counters of one listener.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections refused because `max` were open.
    pub refused: AtomicU64,
    /// Connections closed for making no progress within the timeout.
    pub timed_out: AtomicU64,
}

/// One listener's limit.
#[derive(Debug)]
pub struct Limit {
    permits: Arc<Semaphore>,
    /// Its counters.
    pub counters: Arc<Counters>,
}

/// An admitted connection: while it is held, it counts against the limit.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    counters: Arc<Counters>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admitted {
    /// Counts a connection closed for its timeout.
    pub fn timed_out(&self) {
        self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

impl Limit {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
            counters: Arc::default(),
        }
    }

    /// Admits one more connection, or counts a refusal.
    pub fn admit(&self) -> Option<Admitted> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                self.counters.open.fetch_add(1, Ordering::Relaxed);
                Some(Admitted {
                    _permit: permit,
                    counters: Arc::clone(&self.counters),
                })
            }
            Err(_) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Both listeners' counters, as `GET /health` shows them.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Connections {
    /// The Postgres-protocol listener.
    pub pg: Arc<Counters>,
    /// The HTTP listener.
    pub http: Arc<Counters>,
}

/// The HTTP listener: admits up to its limit, answers `503` beyond it, and wraps each
/// connection in a [`TimedIo`].
pub struct HttpListener {
    inner: TcpListener,
    limit: Limit,
    idle: Duration,
    /// HTTPS: each connection's handshake first.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Handshakes under way (they progress while `accept` waits for the next connection,
    /// so a slow client holds up no other).
    handshakes: futures::stream::FuturesUnordered<Handshake>,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("idle", &self.idle)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl HttpListener {
    /// Serves `inner` with at most `limit` connections, each closed after `idle` without
    /// progress.
    pub fn new(inner: TcpListener, limit: Limit, idle: Duration) -> Self {
        // (A dropped connection's `Admitted` frees its place.)
        Self {
            inner,
            limit,
            idle,
            tls: None,
            handshakes: Default::default(),
        }
    }

    /// Serves HTTPS with `tls` (none: plain HTTP).
    pub fn with_tls(mut self, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        self.tls = tls;
        self
    }
}

/// A TLS handshake under way: the connection once it completes (none if it failed).
type Handshake =
    futures::future::BoxFuture<'static, Option<(TimedIo<HttpStream>, std::net::SocketAddr)>>;

/// An HTTP connection: plain, or TLS.
#[derive(Debug)]
pub enum HttpStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for HttpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            HttpStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The answer to a connection beyond the limit.
fn http_busy() -> Vec<u8> {
    let body = r#"{"error":"too many connections; retry later"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The limits of both listeners (`sluice serve` flags).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Postgres connections at once (`--pg-max-connections`).
    pub pg_max: usize,
    /// How long a Postgres client may take to finish its startup.
    pub pg_startup_timeout: Duration,
    /// HTTP connections at once (`--http-max-connections`).
    pub http_max: usize,
    /// How long an HTTP connection may go without progress (`--http-idle-timeout`).
    pub http_idle: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            pg_max: 100,
            pg_startup_timeout: Duration::from_secs(10),
            http_max: 512,
            http_idle: Duration::from_secs(60),
        }
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = TimedIo<HttpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt;
        loop {
            let accepted = tokio::select! {
                a = self.inner.accept() => a,
                Some(done) = self.handshakes.next(), if !self.handshakes.is_empty() => {
                    match done {
                        Some(ready) => return ready,
                        None => continue,
                    }
                }
            };
            let (mut stream, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.limit.admit() {
                Some(admitted) => match &self.tls {
                    None => {
                        return (
                            TimedIo::new(HttpStream::Plain(stream), self.idle, admitted),
                            addr,
                        );
                    }
                    Some(tls) => {
                        let (tls, idle) = (tls.clone(), self.idle);
                        let limit = if idle.is_zero() {
                            Duration::from_secs(60)
                        } else {
                            idle
                        };
                        self.handshakes.push(Box::pin(async move {
                            match tokio::time::timeout(limit, tls.accept(stream)).await {
                                Ok(Ok(s)) => Some((
                                    TimedIo::new(HttpStream::Tls(Box::new(s)), idle, admitted),
                                    addr,
                                )),
                                Ok(Err(e)) => {
                                    tracing::debug!(%addr, error = %e, "https: handshake failed");
                                    None
                                }
                                Err(_) => {
                                    admitted.timed_out();
                                    None
                                }
                            }
                        }));
                    }
                },
                None if self.tls.is_some() => {
                    tracing::warn!(%addr, "https: too many connections; refused");
                }
                None => {
                    tracing::warn!(%addr, "http: too many connections; refused");
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            stream.write_all(&http_busy()),
                        )
                        .await;
                    });
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that fails with `TimedOut` once a read or write has waited `idle` without
/// progress, and holds its place in the limit while open.
#[derive(Debug)]
pub struct TimedIo<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    admitted: Admitted,
}

impl<S> TimedIo<S> {
    fn new(inner: S, idle: Duration, admitted: Admitted) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
            admitted,
        }
    }

    /// After a poll of the stream: progress (bytes read or written, not a flush of
    /// nothing) disarms the timer; waiting arms it (once) and fails when it fires.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
        progress: bool,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            if progress {
                self.armed = false;
            }
            return r;
        }
        if self.idle.is_zero() {
            return r;
        }
        if !self.armed {
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.idle);
            self.armed = true;
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.admitted.timed_out();
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no progress on the connection within the idle timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.check(cx, r, true)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r, true)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r, false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Refuses a Postgres client: declines its SSL (or GSS) request if it makes one, as
/// Postgres does before it can say anything else, then sends [`pg_too_many_clients`].
pub async fn refuse_pg(socket: &mut TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    const SSL_REQUEST: u32 = 80_877_103;
    const GSS_REQUEST: u32 = 80_877_104;
    let mut head = [0u8; 8];
    socket.read_exact(&mut head).await?;
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if code == SSL_REQUEST || code == GSS_REQUEST {
        socket.write_all(b"N").await?;
        let mut startup = [0u8; 1024];
        let _ = socket.read(&mut startup).await?;
    }
    socket.write_all(&pg_too_many_clients()).await
}

/// The message a Postgres client gets when the server is full: an `ErrorResponse`
/// (`FATAL`, `53300`), as Postgres sends it.
pub fn pg_too_many_clients() -> Vec<u8> {
    let mut fields = Vec::new();
    for (code, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "53300"),
        (b'M', "sorry, too many clients already"),
    ] {
        fields.push(code);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&fields);
    msg
}
