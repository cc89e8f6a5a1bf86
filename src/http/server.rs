//! The HTTP server: accepts connections (bounded), tells HTTP/1.1 from HTTP/2 (prior
//! knowledge, h2c) by the first bytes, serves each with hyper's connection builder of that
//! protocol, and drains gracefully on shutdown.
//!
//! Invariants kept here:
//! - Nothing a client sends, or fails to send, holds a connection slot for long: the first
//!   bytes and then the headers each get `server.header_read_timeout_ms`, whatever the
//!   protocol; an idle HTTP/1 keep-alive connection and an HTTP/2 connection with no open
//!   stream are closed after the same bound; an HTTP/2 peer that stops answering PINGs is
//!   closed after `server.http2_keep_alive_interval_ms` + `server.http2_keep_alive_timeout_ms`.
//! - A connection we close after a response while the client is still sending (an oversized
//!   body) is closed gracefully: our side is shut down first and the client's input is read
//!   and dropped for at most `server.linger_ms` / `server.linger_max_bytes`, so a client that
//!   writes its whole body before reading gets the error response, not a reset.
//! - Once shutdown starts no new connection is accepted, in-flight requests run to
//!   completion (claims are never cut half-way by us), and the server returns within the
//!   configured grace period.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::App;
use crate::backend::Backend;
use crate::config::ServerConfig;
use crate::obs::events::{ConnectionClosed, ConnectionOpened};

/// Smallest read buffer hyper's HTTP/1 connection accepts (it panics below): the buffer is
/// sized for the largest body plus headers, never below this.
const HYPER_MIN_BUF: usize = 8192;

/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How each accepted connection is served (built once from the config).
struct ConnSettings {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    http2_enabled: bool,
    /// First bytes, then headers; also the idle bound of a connection with nothing open.
    header_timeout: Duration,
    /// After an idle HTTP/2 connection was sent GOAWAY: how long it may take to close.
    h2_close_bound: Duration,
    linger: Duration,
    linger_max_bytes: usize,
}

impl ConnSettings {
    fn new(cfg: &ServerConfig) -> ConnSettings {
        let header_timeout = Duration::from_millis(cfg.header_read_timeout_ms);
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true)
            .max_buf_size(cfg.max_body_bytes.max(HYPER_MIN_BUF) + 16 * 1024);
        let keep_alive_timeout = Duration::from_millis(cfg.http2_keep_alive_timeout_ms);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(cfg.http2_max_concurrent_streams)
            .keep_alive_interval(Duration::from_millis(cfg.http2_keep_alive_interval_ms))
            .keep_alive_timeout(keep_alive_timeout);
        ConnSettings {
            http1: h1,
            http2: h2,
            http2_enabled: cfg.http2,
            header_timeout,
            // GOAWAY waits for a PING round trip (h2's graceful shutdown): a live peer
            // answers at once, a dead one within the keep-alive timeout.
            h2_close_bound: keep_alive_timeout.min(header_timeout),
            linger: Duration::from_millis(cfg.linger_ms),
            linger_max_bytes: cfg.linger_max_bytes,
        }
    }
}

/// Serves `listener` until `shutdown` is cancelled, then drains for at most the grace period.
pub async fn serve<B: Backend>(
    app: Arc<App<B>>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let cfg = &app.config().server;
    let settings = Arc::new(ConnSettings::new(cfg));
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();

    loop {
        // Bound open connections: at the limit, stop accepting (the kernel queues).
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (app, settings, drain) = (app.clone(), settings.clone(), drain.clone());
        ConnectionOpened.emit();
        connections.spawn(async move {
            serve_connection(app, stream, peer, &settings, &drain).await;
            ConnectionClosed.emit();
            drop(permit);
        });
    }

    drop(listener);
    app.start_draining();
    drain.cancel();
    connections.close();
    tracing::info!(grace_ms = grace.as_millis() as u64, "draining connections");
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with connections still open; closing them");
    }
}

/// One connection, start to end; every stage is bounded in time.
async fn serve_connection<B: Backend>(
    app: Arc<App<B>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    s: &ConnSettings,
    drain: &CancellationToken,
) {
    let (h2, prefix) = if s.http2_enabled {
        let sniffed = tokio::select! {
            _ = drain.cancelled() => return,
            r = tokio::time::timeout(s.header_timeout, sniff(&mut stream)) => r,
        };
        match sniffed {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => return, // closed before sending anything we could serve
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %peer, "connection failed before its first request");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no request within header_read_timeout_ms; closing");
                return;
            }
        }
    } else {
        (false, Vec::new())
    };
    let io = Prefixed {
        prefix,
        pos: 0,
        inner: stream,
    };
    let result = if h2 {
        serve_h2(app, io, peer, s, drain).await
    } else {
        serve_h1(app, io, peer, s, drain).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Reads until the first bytes tell the protocol: the HTTP/2 preface (`true`) or anything
/// else (`false`, HTTP/1). Returns what was read, to be replayed to hyper; `None` if the
/// client closed first.
async fn sniff(stream: &mut TcpStream) -> io::Result<Option<(bool, Vec<u8>)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    loop {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            return Ok(None);
        }
        n += got;
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some((false, buf[..n].to_vec())));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some((true, buf.to_vec())));
        }
    }
}

type Reply = hyper::Response<Full<Bytes>>;
type ReplyFuture = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

/// The service of one connection. Its future is boxed (hence `Unpin`), as
/// `poll_without_shutdown` needs.
fn service<B: Backend>(
    app: Arc<App<B>>,
    peer: SocketAddr,
    streams: Option<Arc<Streams>>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = Reply,
    Error = Infallible,
    Future = ReplyFuture,
> + Clone {
    service_fn(move |req| -> ReplyFuture {
        let app = app.clone();
        let open = streams.as_ref().map(|s| s.open());
        Box::pin(async move {
            let resp = respond(&app, req, peer).await;
            drop(open);
            Ok(resp)
        })
    })
}

/// HTTP/1.1: hyper bounds the headers of every request and the idle time between them
/// (`header_read_timeout`). When hyper ends the connection (after `Connection: close`, an
/// unread body, or a drain), the socket is closed gracefully ([`linger`]).
async fn serve_h1<B: Backend>(
    app: Arc<App<B>>,
    io: Prefixed,
    peer: SocketAddr,
    s: &ConnSettings,
    drain: &CancellationToken,
) -> Result<(), hyper::Error> {
    let mut conn = s
        .http1
        .serve_connection(TokioIo::new(io), service(app, peer, None));
    let mut drain_signal = pin!(drain.cancelled());
    let mut draining = false;
    let result = std::future::poll_fn(|cx| {
        if !draining && drain_signal.as_mut().poll(cx).is_ready() {
            draining = true;
            Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    match result {
        // A header timeout: the client is too slow to deserve a graceful close.
        Err(e) if e.is_timeout() => Err(e),
        r => {
            let parts = conn.into_parts();
            linger(parts.io.into_inner(), parts.read_buf.len(), s).await;
            r
        }
    }
}

/// Closes a connection without discarding the response we just sent: shuts our side
/// (the client reads the response, then end of stream), then reads and drops what the
/// client still sends, until it closes, `linger_max_bytes` or `linger`. Closing a socket
/// with unread input makes the kernel send a reset, which can destroy the response before
/// the client reads it (a client still writing its body sees a broken pipe).
async fn linger(mut io: Prefixed, already_read: usize, s: &ConnSettings) {
    if s.linger.is_zero() || io.shutdown().await.is_err() {
        return;
    }
    let mut left = s.linger_max_bytes.saturating_sub(already_read);
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(s.linger, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// HTTP/2: hyper pings the peer and closes it when the pings go unanswered; a connection
/// with no open stream (from the preface on) is sent GOAWAY after `header_timeout` and
/// dropped if it is not closed `h2_close_bound` later.
async fn serve_h2<B: Backend>(
    app: Arc<App<B>>,
    io: Prefixed,
    peer: SocketAddr,
    s: &ConnSettings,
    drain: &CancellationToken,
) -> Result<(), hyper::Error> {
    let streams = Arc::new(Streams::new());
    let conn = s
        .http2
        .serve_connection(TokioIo::new(io), service(app, peer, Some(streams.clone())));
    let mut conn = pin!(conn);
    let mut draining = false;
    let mut closing_by: Option<Instant> = None;
    loop {
        let check_idle_at = streams.idle_deadline(s.header_timeout);
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = drain.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(check_idle_at), if closing_by.is_none() => {
                if streams.idle_deadline(s.header_timeout) <= Instant::now() {
                    tracing::debug!(%peer, "HTTP/2 connection idle with no open stream; closing");
                    conn.as_mut().graceful_shutdown();
                    closing_by = Some(Instant::now() + s.h2_close_bound);
                }
            }
            _ = tokio::time::sleep_until(closing_by.unwrap_or_else(Instant::now)),
                if closing_by.is_some() => {
                tracing::debug!(%peer, "idle HTTP/2 connection did not close after GOAWAY; dropping it");
                return Ok(());
            }
        }
    }
}

/// Open streams of an HTTP/2 connection, and when the last one ended.
struct Streams {
    open: AtomicUsize,
    base: Instant,
    /// Milliseconds after `base` when the connection last had no open stream.
    idle_since_ms: AtomicU64,
}

impl Streams {
    fn new() -> Streams {
        Streams {
            open: AtomicUsize::new(0),
            base: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenStream(self.clone())
    }

    /// When the connection is idle for `bound`; with a stream open, `bound` from now (to be
    /// looked at again then).
    fn idle_deadline(&self, bound: Duration) -> Instant {
        if self.open.load(Ordering::SeqCst) > 0 {
            return Instant::now() + bound;
        }
        self.base + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst)) + bound
    }
}

/// A request being served on an HTTP/2 connection.
struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let s = &self.0;
        let now = s.base.elapsed().as_millis() as u64;
        s.idle_since_ms.fetch_max(now, Ordering::SeqCst);
        s.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP stream with the bytes already read from it (the protocol sniff) put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn respond<B: Backend>(
    app: &App<B>,
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
) -> hyper::Response<Full<Bytes>> {
    let resp = super::router::handle(app, req, peer).await;
    if app.is_draining() {
        super::router::closing(resp)
    } else {
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_is_idle_only_with_no_open_stream() {
        let bound = Duration::from_secs(1);
        let streams = Arc::new(Streams::new());
        let opened = Instant::now();
        assert_eq!(streams.idle_deadline(bound), opened + bound);
        tokio::time::advance(Duration::from_secs(5)).await;
        let a = streams.open();
        let b = streams.open();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            streams.idle_deadline(bound),
            Instant::now() + bound,
            "busy: looked at again later"
        );
        drop(a);
        assert!(
            streams.idle_deadline(bound) > Instant::now(),
            "one still open"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let closed_at = Instant::now();
        drop(b);
        let deadline = streams.idle_deadline(bound);
        assert!(
            deadline >= closed_at + bound - Duration::from_millis(1),
            "{deadline:?}"
        );
        assert!(deadline <= closed_at + bound);
    }

    #[tokio::test]
    async fn prefixed_replays_the_sniffed_bytes_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            back
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let (h2, prefix) = sniff(&mut stream).await.unwrap().unwrap();
        assert!(!h2);
        assert!(!prefix.is_empty() && b"GET / HTTP/1.1\r\n".starts_with(&prefix));
        let mut io = Prefixed {
            prefix,
            pos: 0,
            inner: stream,
        };
        let mut got = vec![0u8; 16];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        io.write_all(b"ok").await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(client.await.unwrap(), b"ok");
    }
}
