//! The fault proxy itself, against a loopback echo server: each fault does what the tests that
//! use it take for granted (a reset lands at its byte and is a RST, tiny chunks and latency
//! keep the bytes and their order, a black hole holds everything until it is lifted).

use poco_e2e::FaultProxy;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// An echo server on loopback; returns its port.
fn echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn client(p: &FaultProxy) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Reads until `want` bytes arrived, the peer closed, or an error: (bytes, error kind).
fn read_upto(c: &mut TcpStream, want: usize) -> (Vec<u8>, Option<ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match c.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
    (got, None)
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn the_fault_proxy_resets_delays_splits_and_black_holes_as_told() {
    let p = FaultProxy::start(echo());

    // Plain: what goes in comes back.
    let mut c = client(&p);
    c.write_all(&data(100_000)).unwrap();
    assert_eq!(read_upto(&mut c, 100_000).0, data(100_000));

    // Tiny chunks: same bytes, same order, in many pieces.
    p.tiny_chunks(7);
    c.write_all(&data(20_000)).unwrap();
    assert_eq!(read_upto(&mut c, 20_000).0, data(20_000));
    assert!(p.injected().split_chunks > 0);
    p.tiny_chunks(0);

    // Latency: every chunk later, both ways (so a round trip takes at least twice it).
    p.latency(Duration::from_millis(150));
    let t = Instant::now();
    c.write_all(b"ping").unwrap();
    assert_eq!(read_upto(&mut c, 4).0, b"ping");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert!(p.injected().delayed_chunks >= 2);
    p.latency(Duration::ZERO);

    // Black hole: nothing comes back while it is open; it all arrives once it closes.
    p.black_hole(true);
    c.write_all(b"held").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (got, err) = read_upto(&mut c, 4);
    assert!(got.is_empty() && matches!(err, Some(ErrorKind::WouldBlock | ErrorKind::TimedOut)));
    // A new connection is accepted but gets nowhere either.
    let mut c2 = client(&p);
    c2.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c2.write_all(b"x").unwrap();
    assert!(read_upto(&mut c2, 1).0.is_empty());
    p.black_hole(false);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_upto(&mut c, 4).0, b"held");
    c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_upto(&mut c2, 1).0, b"x");
    assert_eq!(p.injected().black_holes, 1);

    // Reset at a chosen byte: counted over both directions, so 1,000 bytes out and the echo
    // of the first 500 back; the client then sees a reset, not an orderly close.
    p.reset_after(1_500);
    c.write_all(&data(1_000)).unwrap();
    let (got, err) = read_upto(&mut c, 1_000);
    assert!(
        got.len() <= 500 && data(500).starts_with(&got),
        "nothing past the reset's byte arrives ({} bytes)",
        got.len()
    );
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    assert_eq!(p.injected().resets, 1);
    assert!(!p.reset_armed());
    // Only that connection: the other one still works, and new ones too.
    c2.write_all(b"still").unwrap();
    assert_eq!(read_upto(&mut c2, 5).0, b"still");
    let mut c3 = client(&p);
    c3.write_all(b"new").unwrap();
    assert_eq!(read_upto(&mut c3, 3).0, b"new");

    // Cut after n upstream bytes: an orderly close.
    p.cut_after(10);
    let mut c4 = client(&p);
    c4.write_all(&data(100)).unwrap();
    let (got, _) = read_upto(&mut c4, 100);
    assert!(got.is_empty(), "nothing past the cut");
    assert_eq!(p.cuts(), 1);
}
