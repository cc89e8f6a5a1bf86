//! The HTTP server: accepts connections (bounded), serves HTTP/1.1 keep-alive (and h2c
//! when enabled) with hyper, and drains gracefully on shutdown.
//!
//! Invariant kept here: once shutdown starts no new connection is accepted, in-flight
//! requests run to completion (claims are never cut half-way by us), and the server
//! returns within the configured grace period.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::backend::Backend;

/// Serves `listener` until `shutdown` is cancelled, then drains for at most the grace period.
pub async fn serve<B: Backend>(
    app: Arc<App<B>>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let cfg = &app.cfg.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms.max(1)))
        .keep_alive(true)
        .max_buf_size(cfg.max_body_bytes.max(8192) + 16 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = if cfg.http2 {
        builder
    } else {
        builder.http1_only()
    };
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);

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
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(respond(&app, req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
            drop(permit);
        });
    }

    drop(listener);
    app.draining.store(true, Ordering::Release);
    tracing::info!(grace_ms = grace.as_millis() as u64, "draining connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with connections still open; closing them");
    }
}

async fn respond<B: Backend>(
    app: &App<B>,
    req: hyper::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let resp = crate::router::handle(app, req, peer).await;
    if app.is_draining() {
        crate::router::closing(resp)
    } else {
        resp
    }
}
