//! Hostile input for the target parser (issue #6): tens of thousands of generated URLs and
//! jsonb targets, built from the forms an attacker (or a confused user) would try. For every
//! one: no panic; anything accepted with private targets off is a public TCP host with an
//! encrypting sslmode; every generated loopback, private, link-local, socket or multi-host form
//! is refused; the redacted URL never shows the password.
//!
//! Failure messages mask the generated passwords (`shown`). Deterministic: `POCO_FUZZ_SEED` replays a run, `POCO_FUZZ_CASES` (default 12,000 per
//! generator) scales it.

use poco_core::target::{classify_ip, parse_json, parse_url, TargetHost, TargetSpec};
use serde_json::{json, Map, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn seed() -> u64 {
    std::env::var("POCO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0f_f022)
}

fn cases() -> usize {
    std::env::var("POCO_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12_000)
}

/// Hosts that must never be accepted with private targets off, in the spellings an attacker
/// would try (several of them reach 127.0.0.1 through inet_aton's lenient forms).
const PRIVATE_HOSTS: &[&str] = &[
    "127.0.0.1",
    "127.1",
    "127.0.1",
    "0x7f.1",
    "0x7f000001",
    "2130706433",
    "017700000001",
    "0177.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0",
    "10.0.0.5",
    "10.255.1.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.10",
    "169.254.169.254",
    "100.64.0.1",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::ffff:10.0.0.1]",
    "[::ffff:7f00:1]",
    "[fe80::1]",
    "[fc00::1]",
    "[fd12:3456::1]",
    "localhost",
    "LOCALHOST",
    "db.localhost",
    "printer.local",
    "db.internal",
    "nas.lan",
    "router.home.arpa",
    "intranet",
    "db",
];

/// Hosts that are fine when public (the oracle does not insist these parse: the rest of the
/// URL may be broken).
const PUBLIC_HOSTS: &[&str] = &[
    "ep-cool-darkness-123456.us-east-2.aws.neon.tech",
    "db.example.com",
    "8.8.8.8",
    "[2001:4860:4860::8888]",
    "aws-0-eu-central-1.pooler.supabase.com",
];

/// Host parts that are not one TCP host: sockets, several hosts, empty.
const NOT_ONE_HOST: &[&str] = &[
    "%2Ftmp",
    "%2Fvar%2Frun%2Fpostgresql",
    "/tmp",
    "a.example.com,b.example.com",
    "db.example.com:5432,db2.example.com",
    "",
    "@",
    "[",
    "[::1",
    "::1",
];

const SCHEMES: &[&str] = &[
    "postgresql://",
    "postgres://",
    "POSTGRESQL://",
    "postgresql:/",
    "http://",
    "postgresql:///",
    "",
];

const PARAMS: &[&str] = &[
    "sslmode=require",
    "sslmode=verify-full",
    "sslmode=verify-ca",
    "sslmode=disable",
    "sslmode=allow",
    "sslmode=prefer",
    "sslmode=REQUIRE",
    "sslmode=",
    "host=%2Ftmp",
    "host=127.0.0.1",
    "host=localhost",
    "hostaddr=127.0.0.1",
    "hostaddr=10.0.0.1",
    "port=5433",
    "port=0",
    "port=99999",
    "options=-c%20search_path%3Devil",
    "channel_binding=require",
    "application_name=x",
    "target_session_attrs=any",
    "sslrootcert=%2Fetc%2Fpasswd",
    "service=foo",
    "passfile=%2Froot%2F.pgpass",
    "connect_timeout=1",
    "dbname=other",
    "user=other",
    "password=other",
    "",
    "&",
    "=",
    "sslmode",
];

fn junk(r: &mut Rng, max: usize) -> String {
    const ALPHABET: &[&str] = &[
        "a", "Z", "0", "9", "-", "_", ".", "%", "%41", "%2F", "%40", "%3A", "%00", "%ZZ", "@", ":",
        "/", "?", "#", "&", "=", "[", "]", " ", "'", "\"", "\\", "é", "数", "🦀", "\u{0}", "\n",
    ];
    (0..r.below(max + 1)).map(|_| r.pick(ALPHABET)).collect()
}

/// An input as a failure message may show it: the generated passwords masked, so that even a
/// failing run prints no password.
fn shown(input: &str) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find("Pw") {
        let tail = &rest[i..];
        let is_marker = tail.len() >= 20
            && tail.is_char_boundary(18)
            && tail[2..18].bytes().all(|b| b.is_ascii_hexdigit())
            && tail[18..].starts_with("Zz");
        out.push_str(&rest[..i]);
        if is_marker {
            out.push_str("***");
            rest = &tail[20..];
        } else {
            out.push_str("Pw");
            rest = &tail[2..];
        }
    }
    out.push_str(rest);
    out
}

/// A password the test can look for in outputs: nothing else in the URL contains it.
fn marker(r: &mut Rng) -> String {
    format!("Pw{:016x}Zz", r.next())
}

#[derive(PartialEq)]
enum HostKind {
    Private,
    Public,
    NotOne,
}

/// The host as the generator wrote it, in the form the parser stores (no brackets, lower
/// case): when the parsed host is this, the generator's verdict on it applies.
fn stored_form(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn gen_url(r: &mut Rng) -> (String, HostKind, Option<String>, String) {
    let (host, kind) = match r.below(10) {
        0..=4 => (r.pick(PRIVATE_HOSTS).to_string(), HostKind::Private),
        5..=7 => (r.pick(PUBLIC_HOSTS).to_string(), HostKind::Public),
        _ => (r.pick(NOT_ONE_HOST).to_string(), HostKind::NotOne),
    };
    let mut url = r.pick(SCHEMES).to_string();
    let mut password = None;
    if r.chance(70) {
        url.push_str(if r.chance(80) { "alex" } else { "" });
        if r.chance(80) {
            let pw = marker(r);
            url.push(':');
            url.push_str(&pw);
            password = Some(pw);
        }
        if r.chance(10) {
            url.push_str(&junk(r, 4));
        }
        url.push('@');
    }
    url.push_str(&host);
    if r.chance(40) {
        url.push(':');
        url.push_str(r.pick(&["5432", "6543", "0", "65536", "-1", "abc", "", "5432x"]));
    }
    if r.chance(80) {
        url.push('/');
        url.push_str(r.pick(&["neondb", "postgres", "my%20db", "", "a/b"]));
    }
    if r.chance(85) {
        url.push('?');
        let n = 1 + r.below(3);
        let params: Vec<&str> = (0..n).map(|_| r.pick(PARAMS)).collect();
        url.push_str(&params.join("&"));
    }
    if r.chance(5) {
        url.push_str(&junk(r, 6));
    }
    (url, kind, password, host)
}

/// A URL mutated byte-wise: flipped, inserted and deleted characters.
fn mutate(r: &mut Rng, url: &str) -> String {
    let mut chars: Vec<char> = url.chars().collect();
    for _ in 0..1 + r.below(4) {
        if chars.is_empty() {
            break;
        }
        let i = r.below(chars.len());
        match r.below(3) {
            0 => {
                chars.remove(i);
            }
            1 => {
                let c = junk(r, 1).chars().next().unwrap_or('x');
                chars.insert(i, c);
            }
            _ => {
                let c = chars[i] as u32 ^ (1 << r.below(7));
                chars[i] = char::from_u32(c).unwrap_or('?');
            }
        }
    }
    chars.into_iter().collect()
}

/// What an accepted target must satisfy with private targets off.
fn check_public(input: &str, t: &TargetSpec) {
    let input = &shown(input);
    assert!(
        !t.sslmode.may_be_plaintext(),
        "{input:?}: plaintext sslmode accepted with private targets off"
    );
    match &t.host {
        TargetHost::Name(n) => {
            let n = n.to_ascii_lowercase();
            assert!(
                n.contains('.')
                    && !n.contains('/')
                    && !n.contains(',')
                    && n != "localhost"
                    && ![
                        ".localhost",
                        ".local",
                        ".internal",
                        ".lan",
                        ".home.arpa",
                        ".intranet",
                        ".corp"
                    ]
                    .iter()
                    .any(|s| n.ends_with(s)),
                "{input:?}: host {n:?} accepted with private targets off"
            );
            // A name that is an address in disguise must have been read as that address.
            assert!(
                n.parse::<std::net::IpAddr>().is_err(),
                "{input:?}: address {n:?} kept as a name"
            );
        }
        other => {
            let ip = other.ip().expect("an IP host");
            assert_eq!(
                classify_ip(ip),
                None,
                "{input:?}: {ip} accepted with private targets off"
            );
        }
    }
}

fn check_redaction(input: &str, t: &TargetSpec, password: Option<&str>) {
    let input = &shown(input);
    if let Some(pw) = password {
        let redacted = t.redacted_url();
        assert!(
            !redacted.contains(pw),
            "{input:?}: the password shows in the redacted URL {:?}",
            shown(&redacted)
        );
        let debug = format!("{t:?}");
        assert!(
            !debug.contains(pw),
            "{input:?}: the password shows in the Debug form"
        );
    }
}

/// Parse without letting a panic escape: the input is reported instead.
fn parse_no_panic<T>(input: &str, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("the parser panicked on {:?}", shown(input)),
    }
}

#[test]
fn generated_urls_never_panic_and_never_let_a_private_host_through() {
    let mut r = Rng(seed());
    let (mut accepted, mut refused_private) = (0usize, 0usize);
    for _ in 0..cases() {
        let (url, kind, password, host) = gen_url(&mut r);
        let parsed = parse_no_panic(&url, || parse_url(&url));
        let Ok(t) = parsed else { continue };
        check_redaction(&url, &t, password.as_deref());
        // Junk may have turned the generated host into another (public) name; then the
        // structural checks alone apply.
        let intact = t.host.as_string().to_ascii_lowercase() == stored_form(&host)
            || (kind == HostKind::Private && t.host.ip().is_some());
        match t.validate(false) {
            Ok(()) => {
                accepted += 1;
                check_public(&url, &t);
                assert!(
                    kind == HostKind::Public || !intact,
                    "{:?}: a {} host was accepted with private targets off: {:?}",
                    shown(&url),
                    if kind == HostKind::Private {
                        "private"
                    } else {
                        "socket or multi-host"
                    },
                    t.host
                );
            }
            Err(_) => {
                if kind == HostKind::Private {
                    refused_private += 1;
                }
            }
        }
        // Allowing private targets lets private hosts through, never several hosts or sockets.
        if t.validate(true).is_ok() {
            if let TargetHost::Name(n) = &t.host {
                assert!(
                    !n.contains('/') && !n.contains(','),
                    "{:?}: {n:?} accepted as one host",
                    shown(&url)
                );
            }
        }
    }
    // The generator must actually reach both outcomes, or the test proves nothing.
    assert!(accepted > cases() / 100, "only {accepted} URLs accepted");
    assert!(
        refused_private > cases() / 50,
        "only {refused_private} private URLs parsed and refused"
    );
}

#[test]
fn mutated_urls_never_panic_and_never_let_a_private_host_through() {
    let mut r = Rng(seed() ^ 0x9e37_79b9_7f4a_7c15);
    for _ in 0..cases() {
        let (url, _, _, _) = gen_url(&mut r);
        let m = mutate(&mut r, &url);
        let parsed = parse_no_panic(&m, || parse_url(&m));
        if let Ok(t) = parsed {
            if t.validate(false).is_ok() {
                check_public(&m, &t);
            }
        }
    }
}

#[test]
fn generated_json_targets_never_panic_and_never_let_a_private_host_through() {
    let mut r = Rng(seed() ^ 0x0123_4567_89ab_cdef);
    // Keys a target may not hold: unknown, or known ones misspelled.
    const ODD_KEYS: &[&str] = &["PGHOSTADDR", "pghost", "", "DATABASE_URL "];
    let mut accepted = 0usize;
    for _ in 0..cases() {
        let (url, kind, password, _) = gen_url(&mut r);
        let mut private = kind == HostKind::Private;
        let mut public_host = kind == HostKind::Public;
        let mut obj = Map::new();
        let mut pw = password;
        for _ in 0..1 + r.below(3) {
            // Mostly the known keys; now and then an unknown or misspelled one.
            let k = if r.chance(92) {
                r.pick(poco_core::target::JSON_TARGET_KEYS)
            } else {
                r.pick(ODD_KEYS)
            };
            let v: Value = match (k, r.below(10)) {
                ("DATABASE_URL", 0..=6) => json!(url.clone()),
                ("PGHOST", 0..=6) => {
                    let (h, hk) = if r.chance(50) {
                        (r.pick(PRIVATE_HOSTS), HostKind::Private)
                    } else {
                        (r.pick(PUBLIC_HOSTS), HostKind::Public)
                    };
                    private |= hk == HostKind::Private;
                    public_host |= hk == HostKind::Public;
                    json!(h.trim_start_matches('[').trim_end_matches(']'))
                }
                ("PGPORT", 0..=3) => json!(5432),
                ("PGPORT", 4..=6) => json!("6543"),
                ("PGPASSWORD", 0..=6) => {
                    let m = marker(&mut r);
                    pw = Some(m.clone());
                    json!(m)
                }
                ("PGSSLMODE", 0..=6) => json!(r.pick(&["require", "disable", "verify-full", "x"])),
                (_, 7) => json!(null),
                (_, 8) => json!(r.below(70000)),
                (_, 9) => json!([url.clone()]),
                _ => json!(junk(&mut r, 8)),
            };
            obj.insert(k.to_string(), v);
        }
        let v = if r.chance(10) {
            json!(url.clone())
        } else {
            Value::Object(obj)
        };
        let text = v.to_string();
        let parsed = parse_no_panic(&text, || parse_json(&v));
        let Ok(t) = parsed else { continue };
        check_redaction(&text, &t, pw.as_deref());
        if t.validate(false).is_ok() {
            accepted += 1;
            check_public(&text, &t);
            // Where the URL and a key both name the host they must agree, so a private host
            // given either way cannot have been replaced by a public one.
            assert!(
                !private || public_host,
                "{}: a private host was accepted with private targets off",
                shown(&text)
            );
        }
    }
    assert!(
        accepted > cases() / 200,
        "only {accepted} json targets accepted"
    );
}

#[test]
fn failure_messages_mask_the_generated_passwords() {
    let mut r = Rng(7);
    let pw = marker(&mut r);
    assert_eq!(
        shown(&format!("postgresql://u:{pw}@h/db?x=Pw&y={pw}")),
        "postgresql://u:***@h/db?x=Pw&y=***"
    );
}
