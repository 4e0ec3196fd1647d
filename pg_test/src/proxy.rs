//! A TCP fault proxy on 127.0.0.1 between the platform and a learner server (tokio, on a
//! thread of its own). On command it:
//! - resets (TCP RST) the connection that carries a chosen byte: `reset_after(n)` arms a
//!   countdown over the bytes of every connection, both directions; the chunk that crosses it is
//!   forwarded up to that byte, then its connection is reset on both sides (once per arming);
//! - closes every connection after a number of client→server bytes (`cut_after`, a FIN);
//! - black-holes: nothing moves in either direction and new connections are accepted but get
//!   no answer, until it is lifted (what was held then moves on, like a healed network);
//! - adds latency to every chunk, both directions, in order, without limiting bandwidth;
//! - splits the data into tiny chunks (1..=n bytes, TCP_NODELAY), both directions;
//! - slows client→server data down (`delay_per_8k`, bandwidth).
//!
//! It keeps the first bytes each connection sent upstream (to read the TLS ClientHello's SNI)
//! and counts what it injected. Loopback only; everything ends when the proxy is dropped.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

/// What a proxy injected so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    /// Connections reset (RST) at an armed byte.
    pub resets: u64,
    /// Connections closed by `cut_after`.
    pub cuts: u64,
    /// Black holes opened (each counted once, however many connections it held).
    pub black_holes: u64,
    /// Chunks delivered late by `latency`.
    pub delayed_chunks: u64,
    /// Chunks split by `tiny_chunks`.
    pub split_chunks: u64,
    /// Connections accepted.
    pub connections: u64,
}

#[derive(Default)]
struct State {
    /// Bytes (both directions, all connections) before the next reset; 0: none armed.
    reset_in: AtomicU64,
    /// Close each connection once it has sent this many bytes upstream (0: never).
    cut_after: AtomicU64,
    black_hole: AtomicBool,
    latency_ms: AtomicU64,
    /// Forward in pieces of at most this many bytes (0: as read).
    tiny: AtomicU64,
    /// Sleep this many milliseconds per 8 KiB sent upstream.
    delay_ms: AtomicU64,
    resets: AtomicU64,
    cuts: AtomicU64,
    black_holes: AtomicU64,
    delayed: AtomicU64,
    split: AtomicU64,
    connections: AtomicU64,
    /// A small generator for the tiny chunks' sizes.
    rng: AtomicU64,
    /// The first bytes sent upstream by the most recent connection.
    first: Mutex<Vec<u8>>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            rng: AtomicU64::new(0x2545_f491_4f6c_dd1d),
            ..State::default()
        });
        let (stop, stopped) = watch::channel(false);
        let st = state.clone();
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let mut stop_rx = stopped.clone();
                loop {
                    let client = tokio::select! {
                        c = listener.accept() => c,
                        _ = stop_rx.changed() => break,
                    };
                    let Ok((client, _)) = client else { continue };
                    st.connections.fetch_add(1, Ordering::SeqCst);
                    let (st, stopped) = (st.clone(), stopped.clone());
                    tokio::spawn(async move {
                        // Black-holed: the connection waits, unanswered, for the hole to close.
                        while st.black_hole.load(Ordering::SeqCst) && !*stopped.borrow() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                        else {
                            return;
                        };
                        connection(client, server, st, stopped).await;
                    });
                }
            });
            // Dropping the runtime drops every connection's sockets.
        });
        FaultProxy { port, state, stop }
    }

    /// Reset the connection carrying the `bytes`-th byte from now (all connections, both
    /// directions); fires once. 0 disarms.
    pub fn reset_after(&self, bytes: u64) {
        self.state.reset_in.store(bytes, Ordering::SeqCst);
    }

    /// Whether an armed reset is still waiting for its byte.
    pub fn reset_armed(&self) -> bool {
        self.state.reset_in.load(Ordering::SeqCst) > 0
    }

    /// Close every connection (current and future) after `bytes` sent upstream; 0 stops cutting.
    pub fn cut_after(&self, bytes: u64) {
        self.state.cut_after.store(bytes, Ordering::SeqCst);
    }

    /// Open (true) or close (false) a black hole.
    pub fn black_hole(&self, on: bool) {
        if on && !self.state.black_hole.swap(true, Ordering::SeqCst) {
            self.state.black_holes.fetch_add(1, Ordering::SeqCst);
        } else if !on {
            self.state.black_hole.store(false, Ordering::SeqCst);
        }
    }

    /// Deliver every chunk this much later, both directions (0: none).
    pub fn latency(&self, d: Duration) {
        self.state
            .latency_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Forward in pieces of 1..=max bytes (0: as read).
    pub fn tiny_chunks(&self, max: u64) {
        self.state.tiny.store(max, Ordering::SeqCst);
    }

    /// Slow client→server data down: this many milliseconds per 8 KiB.
    pub fn delay_per_8k(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Back to a plain proxy (an armed reset is disarmed, a black hole closed).
    pub fn heal(&self) {
        self.reset_after(0);
        self.cut_after(0);
        self.black_hole(false);
        self.latency(Duration::ZERO);
        self.tiny_chunks(0);
        self.delay_per_8k(0);
    }

    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    pub fn injected(&self) -> Injected {
        let s = &self.state;
        Injected {
            resets: s.resets.load(Ordering::SeqCst),
            cuts: s.cuts.load(Ordering::SeqCst),
            black_holes: s.black_holes.load(Ordering::SeqCst),
            delayed_chunks: s.delayed.load(Ordering::SeqCst),
            split_chunks: s.split.load(Ordering::SeqCst),
            connections: s.connections.load(Ordering::SeqCst),
        }
    }

    /// The server name the most recent connection's TLS ClientHello carried (SNI), if it
    /// started TLS with one. The client first sends PostgreSQL's 8-byte SSLRequest.
    pub fn last_sni(&self) -> Option<String> {
        let first = self.state.first.lock().unwrap().clone();
        let hello = first.strip_prefix(&[0, 0, 0, 8, 4, 210, 22, 47][..])?;
        client_hello_sni(hello)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Set SO_LINGER to zero, so that closing the socket sends a RST instead of a FIN.
fn linger_zero(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: fd is a socket this process owns; the option value is a valid `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn connection(
    client: TcpStream,
    server: TcpStream,
    st: Arc<State>,
    stopped: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    st.first.lock().unwrap().clear();
    // Either direction ending (EOF, error, a reset, a cut) ends the connection.
    let (done_tx, done) = watch::channel(false);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let conn = Conn {
        fds,
        reset: AtomicBool::new(false),
        done: done_tx,
    };
    let conn = Arc::new(conn);
    let up = pump(cr, sw, true, st.clone(), conn.clone(), done.clone());
    let down = pump(sr, cw, false, st.clone(), conn, done);
    let mut stopped = stopped;
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = stopped.changed() => {}
    }
}

/// One connection's two sockets, and whether it is being reset.
struct Conn {
    fds: [i32; 2],
    reset: AtomicBool,
    /// Either direction ending ends the other.
    done: watch::Sender<bool>,
}

/// One direction. Reads, applies the faults in force, writes through a queue so that latency
/// delays chunks without limiting bandwidth.
async fn pump(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    upstream: bool,
    st: Arc<State>,
    conn: Arc<Conn>,
    mut done: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, bool)>();
    let writer = tokio::spawn(write_queue(to, rx, st.clone(), conn.clone()));
    let mut buf = vec![0u8; 16384];
    let mut sent: u64 = 0;
    'read: loop {
        while st.black_hole.load(Ordering::SeqCst) {
            if *done.borrow() {
                break 'read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = done.changed() => break,
        };
        // Read before the hole opened, held until it closes.
        while st.black_hole.load(Ordering::SeqCst) {
            if *done.borrow() {
                break 'read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut n = n;
        let mut reset = false;
        // An armed reset: count the bytes down; the chunk that crosses it is cut at its byte.
        let mut left = st.reset_in.load(Ordering::SeqCst);
        while left > 0 {
            let next = left.saturating_sub(n as u64);
            match st
                .reset_in
                .compare_exchange(left, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    if next == 0 {
                        n = (left as usize).min(n);
                        reset = true;
                    }
                    break;
                }
                Err(now) => left = now,
            }
        }
        if upstream {
            let cut = st.cut_after.load(Ordering::SeqCst);
            if cut > 0 && sent + n as u64 > cut {
                st.cuts.fetch_add(1, Ordering::SeqCst);
                break;
            }
            let d = st.delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d * (n as u64).div_ceil(8192))).await;
            }
            let mut first = st.first.lock().unwrap();
            let room = 4096usize.saturating_sub(first.len()).min(n);
            first.extend_from_slice(&buf[..room]);
        }
        sent += n as u64;
        let lat = st.latency_ms.load(Ordering::SeqCst);
        if lat > 0 {
            st.delayed.fetch_add(1, Ordering::SeqCst);
        }
        let due = Instant::now() + Duration::from_millis(lat);
        if tx.send((due, buf[..n].to_vec(), reset)).is_err() {
            break;
        }
        if reset {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
    let _ = conn.done.send(true);
}

/// Writes the queued chunks when they are due; returns whether the last one asked for a reset.
async fn write_queue(
    mut to: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>, bool)>,
    st: Arc<State>,
    conn: Arc<Conn>,
) {
    write_chunks(&mut to, &mut rx, &st, &conn).await;
    if conn.reset.load(Ordering::SeqCst) {
        // No FIN before the RST: the half is forgotten, the socket closes with both halves.
        to.forget();
    }
}

async fn write_chunks(
    to: &mut OwnedWriteHalf,
    rx: &mut mpsc::UnboundedReceiver<(Instant, Vec<u8>, bool)>,
    st: &State,
    conn: &Conn,
) {
    while let Some((due, data, reset)) = rx.recv().await {
        if conn.reset.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep_until(due).await;
        let tiny = st.tiny.load(Ordering::SeqCst);
        let mut rest = &data[..];
        if tiny > 0 && rest.len() > 1 {
            st.split.fetch_add(1, Ordering::SeqCst);
        }
        while !rest.is_empty() {
            let take = if tiny > 0 {
                let r = st
                    .rng
                    .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (1 + (r >> 33) % tiny) as usize
            } else {
                rest.len()
            };
            let (now, later) = rest.split_at(take.min(rest.len()));
            if to.write_all(now).await.is_err() {
                return;
            }
            if tiny > 0 {
                tokio::task::yield_now().await;
            }
            rest = later;
        }
        if reset {
            // RST both ways: linger 0 on both sockets, closed when their halves are dropped.
            st.resets.fetch_add(1, Ordering::SeqCst);
            for fd in conn.fds {
                linger_zero(fd);
            }
            conn.reset.store(true, Ordering::SeqCst);
            let _ = conn.done.send(true);
            return;
        }
    }
}

/// The host_name of the server_name extension of a TLS ClientHello record (RFC 8446 4.1.2,
/// RFC 6066 3), or None if it has none or the bytes are not a whole ClientHello.
pub fn client_hello_sni(rec: &[u8]) -> Option<String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn len(b: &mut &[u8], n: usize) -> Option<usize> {
        Some(take(b, n)?.iter().fold(0usize, |a, &x| a << 8 | x as usize))
    }
    let mut b = rec;
    if take(&mut b, 1)? != [22] {
        return None; // not a handshake record
    }
    take(&mut b, 4)?; // version, record length
    if take(&mut b, 1)? != [1] {
        return None; // not a ClientHello
    }
    take(&mut b, 3 + 2 + 32)?; // length, legacy version, random
    let n = len(&mut b, 1)?;
    take(&mut b, n)?; // session id
    let n = len(&mut b, 2)?;
    take(&mut b, n)?; // cipher suites
    let n = len(&mut b, 1)?;
    take(&mut b, n)?; // compression methods
    let n = len(&mut b, 2)?;
    let mut ext = take(&mut b, n)?;
    while !ext.is_empty() {
        let kind = len(&mut ext, 2)?;
        let n = len(&mut ext, 2)?;
        let mut body = take(&mut ext, n)?;
        if kind == 0 {
            len(&mut body, 2)?; // server name list length
            if take(&mut body, 1)? != [0] {
                return None; // not a host_name
            }
            let n = len(&mut body, 2)?;
            return String::from_utf8(take(&mut body, n)?.to_vec()).ok();
        }
    }
    None
}
