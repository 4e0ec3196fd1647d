//! A TCP fault proxy on 127.0.0.1 for push tests: forwards to a learner server and, on
//! command, cuts every connection after a number of client→server bytes, or slows that
//! direction down. Loopback only; threads end when their sockets close.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
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
