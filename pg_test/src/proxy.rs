//! A TCP fault proxy on 127.0.0.1 for push tests: forwards to a learner server and, on
//! command, cuts every connection after a number of client→server bytes, or slows that
//! direction down. It keeps the first bytes each connection sent upstream (to read the TLS
//! ClientHello's SNI). Loopback only; threads end when their sockets close.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Cut each connection once it has sent this many bytes upstream (0: never).
    cut_after: AtomicU64,
    /// Sleep this many milliseconds per 8 KiB sent upstream.
    delay_ms: AtomicU64,
    /// Connections cut so far.
    cuts: AtomicU64,
    /// The first bytes sent upstream by the most recent connection.
    first: Mutex<Vec<u8>>,
    stop: AtomicBool,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let st_up = st.clone();
                thread::spawn(move || pump_up(client, server, st_up));
                thread::spawn(move || pump_down(s2, c2));
            }
        });
        FaultProxy { port, state }
    }

    /// Cut every connection (current and future) after `bytes` sent upstream; 0 stops cutting.
    pub fn cut_after(&self, bytes: u64) {
        self.state.cut_after.store(bytes, Ordering::SeqCst);
    }

    pub fn delay_per_8k(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// The server name the most recent connection's TLS ClientHello carried (SNI), if it
    /// started TLS with one. The client first sends PostgreSQL's 8-byte SSLRequest.
    pub fn last_sni(&self) -> Option<String> {
        let first = self.state.first.lock().unwrap().clone();
        let hello = first.strip_prefix(&[0, 0, 0, 8, 4, 210, 22, 47][..])?;
        client_hello_sni(hello)
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

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the accept loop
    }
}

fn pump_up(mut from: TcpStream, mut to: TcpStream, st: Arc<State>) {
    let mut buf = [0u8; 8192];
    let mut sent: u64 = 0;
    st.first.lock().unwrap().clear();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let cut = st.cut_after.load(Ordering::SeqCst);
        if cut > 0 && sent + n as u64 > cut {
            st.cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        let d = st.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            thread::sleep(Duration::from_millis(d));
        }
        {
            let mut first = st.first.lock().unwrap();
            let room = 4096usize.saturating_sub(first.len()).min(n);
            first.extend_from_slice(&buf[..room]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn pump_down(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
