//! A TCP fault proxy for tests: forwards a free local port to a target (a database) and can
//! simulate an outage. Invariant kept here: while cut, no byte gets through in either
//! direction: every open connection is dropped and new ones are closed on accept.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FaultProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: connection tasks watch it and drop their sockets.
    generation: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (free port) and forwards to `target`, on the current runtime.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let gen_rx = generation.subscribe();
        let cut2 = cut.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if cut2.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let mut gen_rx = gen_rx.clone();
                let born = *gen_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = async {
                            while gen_rx.changed().await.is_ok() {
                                if *gen_rx.borrow() != born {
                                    break;
                                }
                            }
                        } => {}
                    }
                    // Dropping both sockets here closes them: the outage is abrupt.
                });
            }
        });
        FaultProxy {
            port,
            cut,
            generation,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `url` (a PostgreSQL URL) pointed at a proxy on 127.0.0.1:`port`.
pub fn proxied(url: &str, port: u16) -> String {
    // postgres://user@host:port/db -> postgres://user@127.0.0.1:<port>/db
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}127.0.0.1:{port}/{path}")
}

/// The address of the PostgreSQL server of `url` (port 5432 unless named).
pub async fn pg_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split_once('/').unwrap().0;
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    };
    tokio::net::lookup_host(host).await.unwrap().next().unwrap()
}
