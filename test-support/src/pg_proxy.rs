//! TCP proxies in front of PostgreSQL, for the faults a client meets on
//! the network.
//!
//! [`AnswerLosingProxy`] loses one answer: the first statement whose text
//! carries a marker runs to its end (it commits), and the client sees its
//! connection cut instead of the reply. That is the ambiguous failure a
//! dropped network or a restarted pooler gives: the client cannot tell
//! whether its write happened. [`OutageProxy`] takes the database away for
//! as long as a test wants.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// ReadyForQuery with its length: the last message of every answer to a
/// Sync (or a simple query), sent once the statement has committed.
const READY_FOR_QUERY: [u8; 5] = [b'Z', 0, 0, 0, 5];

/// host:port of the server `pool` connects to.
fn server_of(pool: &sqlx::PgPool) -> String {
    let options = pool.connect_options();
    format!("{}:{}", options.get_host(), options.get_port())
}

/// `pool`'s connection options (database, user), pointed at a proxy.
fn options_through(pool: &sqlx::PgPool, proxy: SocketAddr) -> sqlx::postgres::PgConnectOptions {
    (*pool.connect_options())
        .clone()
        .host("127.0.0.1")
        .port(proxy.port())
}

pub struct AnswerLosingProxy {
    pub addr: SocketAddr,
    cuts: Arc<AtomicUsize>,
}

impl AnswerLosingProxy {
    /// Forward to `upstream` (host:port); the first statement whose text
    /// contains `marker` gets its answer lost. Its text is sent when it is
    /// prepared, new to the connection: sqlx prepares (Parse, Describe,
    /// Sync: one ReadyForQuery) and then runs it (Bind, Execute, Sync:
    /// another), so the connection is cut at the second ReadyForQuery.
    pub async fn start(upstream: String, marker: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(true));
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = cuts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(forward(client, server, marker, armed.clone(), counted.clone()));
            }
        });
        AnswerLosingProxy { addr, cuts }
    }

    /// In front of the server `pool` connects to.
    pub async fn in_front_of(pool: &sqlx::PgPool, marker: &'static [u8]) -> Self {
        Self::start(server_of(pool), marker).await
    }

    /// A pool of up to `max_connections` to `pool`'s database, through
    /// this proxy.
    pub async fn pool(&self, pool: &sqlx::PgPool, max_connections: u32) -> sqlx::PgPool {
        // The proxy reads the statements it loses the answers of.
        let options = options_through(pool, self.addr).ssl_mode(sqlx::postgres::PgSslMode::Disable);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await
            .expect("connecting through the proxy")
    }

    /// Answers lost so far (0 or 1).
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

async fn forward(
    client: TcpStream,
    server: TcpStream,
    marker: &'static [u8],
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let doomed = Arc::new(AtomicBool::new(false));
    let dooming = doomed.clone();
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let sent = &buf[..n];
            if sent.windows(marker.len()).any(|w| w == marker) && armed.swap(false, Ordering::SeqCst) {
                dooming.store(true, Ordering::SeqCst);
            }
            if server_write.write_all(sent).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    // The last bytes read since the marker, to see where answers end.
    let mut tail: Vec<u8> = Vec::new();
    let mut ready = 0;
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !doomed.load(Ordering::SeqCst) {
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            continue;
        }
        tail.extend_from_slice(&buf[..n]);
        let len = tail.len();
        if len >= 6 && tail[len - 6..len - 1] == READY_FOR_QUERY {
            ready += 1;
            if ready == 2 {
                // Run and committed: the client gets its connection cut,
                // not the answer.
                cuts.fetch_add(1, Ordering::SeqCst);
                break;
            }
            // The statement prepared: that answer goes through.
            if client_write.write_all(&tail).await.is_err() {
                break;
            }
            tail.clear();
            continue;
        }
    }
    upstream.abort();
}

/// A TCP proxy in front of PostgreSQL that can be cut off: an outage as a
/// client sees one (a failover, a network partition) for as long as a test
/// wants, then the database back on the same address.
pub struct OutageProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl OutageProxy {
    /// Forward to the server `pool` connects to, up until [`Self::cut`].
    pub async fn in_front_of(pool: &sqlx::PgPool) -> Self {
        let upstream = server_of(pool);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let links = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (refusing, linked) = (down.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Closed at once while the database is away.
                if refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let link = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                linked.lock().unwrap().push(link.abort_handle());
            }
        });
        OutageProxy { addr, down, links }
    }

    /// A pool of up to `max_connections` through this proxy, each wait for
    /// a connection ending after `acquire_timeout`.
    pub fn pool(
        &self,
        pool: &sqlx::PgPool,
        max_connections: u32,
        acquire_timeout: std::time::Duration,
    ) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options_through(pool, self.addr))
    }

    /// The database goes away: every connection through the proxy is
    /// closed, and new ones are closed as they come.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// The database is back on the same address.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}
