//! A fake learner for the cap tests (issue #24 point 5): it completes the startup as a
//! PostgreSQL server would, then floods. Every connection sends at most FLOOD_MAX bytes and
//! is then closed, so no loop is unbounded; only loopback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The most one connection sends (2 GB): past any cap, bounded.
const FLOOD_MAX: u64 = 2 << 30;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Flood {
    /// A ParameterStatus of 1 GB during the startup.
    HugeParameterStatus,
    /// The answer to the first query: one DataRow of 1 GB.
    HugeDataRow,
    /// The answer to the first query: rows of 100 bytes without end.
    EndlessRows,
}

pub struct FloodServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Bytes sent, all connections together.
    pub sent: Arc<AtomicU64>,
}

impl FloodServer {
    pub fn start(mode: Flood) -> FloodServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, n2) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (s3, n3) = (s2.clone(), n2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(sock, mode, &s3, &n3);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        FloodServer { port, stop, sent }
    }
}

impl Drop for FloodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn read_exact(sock: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    sock.read_exact(&mut b)?;
    Ok(b)
}

/// Send `total` filler bytes (after a header already sent), stopping when the client closes.
fn filler(sock: &mut TcpStream, total: u64, stop: &AtomicBool, sent: &AtomicU64) {
    let chunk = vec![b'x'; 64 << 10];
    let mut left = total.min(FLOOD_MAX);
    while left > 0 && !stop.load(Ordering::SeqCst) {
        let n = (chunk.len() as u64).min(left) as usize;
        if sock.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n as u64;
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn serve(mut sock: TcpStream, mode: Flood, stop: &AtomicBool, sent: &AtomicU64) -> std::io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    // SSLRequest / GSSENCRequest: refused ('N'); then the startup message.
    loop {
        let head = read_exact(&mut sock, 8)?;
        let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if code == 80877103 || code == 80877104 {
            sock.write_all(b"N")?;
            continue;
        }
        read_exact(&mut sock, len.saturating_sub(8))?;
        break;
    }
    sock.write_all(&message(b'R', &0i32.to_be_bytes()))?; // AuthenticationOk
    if mode == Flood::HugeParameterStatus {
        let len: i32 = (1 << 30) + 4;
        let mut h = vec![b'S'];
        h.extend_from_slice(&len.to_be_bytes());
        sock.write_all(&h)?;
        filler(&mut sock, 1 << 30, stop, sent);
        return Ok(());
    }
    for (k, v) in [("server_version", "15.20"), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("integer_datetimes", "on"), ("standard_conforming_strings", "on")] {
        let mut b = k.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
        sock.write_all(&message(b'S', &b))?;
    }
    let mut key = 4242i32.to_be_bytes().to_vec();
    key.extend_from_slice(&7i32.to_be_bytes());
    sock.write_all(&message(b'K', &key))?;
    sock.write_all(&message(b'Z', b"I"))?;
    // RowDescription: one text column.
    let mut rd = 1i16.to_be_bytes().to_vec();
    rd.extend_from_slice(b"x\0");
    rd.extend_from_slice(&0i32.to_be_bytes());
    rd.extend_from_slice(&0i16.to_be_bytes());
    rd.extend_from_slice(&25i32.to_be_bytes());
    rd.extend_from_slice(&(-1i16).to_be_bytes());
    rd.extend_from_slice(&(-1i32).to_be_bytes());
    rd.extend_from_slice(&0i16.to_be_bytes());
    // The first query that runs (simple, or an extended one's Bind): its answer floods. A
    // statement only prepared (Parse, Describe, Sync) is described as returning one text column.
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let head = read_exact(&mut sock, 5)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        read_exact(&mut sock, len.saturating_sub(4))?;
        match head[0] {
            b'X' => return Ok(()),
            b'Q' => {
                sock.write_all(&message(b'T', &rd))?;
                break;
            }
            b'S' if batch.contains(&b'B') => {
                if batch.contains(&b'P') {
                    sock.write_all(&message(b'1', b""))?;
                }
                sock.write_all(&message(b'2', b""))?;
                break;
            }
            b'S' => {
                if batch.contains(&b'P') {
                    sock.write_all(&message(b'1', b""))?;
                    sock.write_all(&message(b't', &0i16.to_be_bytes()))?;
                    sock.write_all(&message(b'T', &rd))?;
                }
                sock.write_all(&message(b'Z', b"I"))?;
                batch.clear();
            }
            tag => batch.push(tag),
        }
    }
    match mode {
        Flood::HugeDataRow => {
            let len: i32 = (1 << 30) + 4;
            let mut h = vec![b'D'];
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&1i16.to_be_bytes());
            h.extend_from_slice(&((1i32 << 30) - 6).to_be_bytes());
            sock.write_all(&h)?;
            filler(&mut sock, (1 << 30) - 6, stop, sent);
        }
        _ => {
            let mut body = 1i16.to_be_bytes().to_vec();
            body.extend_from_slice(&94i32.to_be_bytes());
            body.extend(std::iter::repeat_n(b'r', 94));
            let row = message(b'D', &body);
            let burst: Vec<u8> = row.iter().copied().cycle().take(row.len() * 600).collect();
            let mut total = 0u64;
            while total < FLOOD_MAX && !stop.load(Ordering::SeqCst) {
                if sock.write_all(&burst).is_err() {
                    break;
                }
                total += burst.len() as u64;
                sent.fetch_add(burst.len() as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}
