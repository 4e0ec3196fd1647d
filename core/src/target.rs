//! Learner targets: parse a URL or a jsonb object into a validated connection spec.
//!
//! URL syntax is handled by the `url` crate (RFC 3986 authority, bracketed IPv6, percent
//! encoding); host names go through `url::Host::parse`, the WHATWG host parser, so every
//! spelling getaddrinfo would accept for an IPv4 address (`127.1`, `0x7f.1`, `2130706433`)
//! is canonicalised before the private-address check and cannot slip past it.
//!
//! Values are never echoed in errors except host names and parameter names, which are not
//! secrets; the password only ever lives in a [`Secret`].

use crate::error::{PocoError, Result};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A password. Its Debug form is redacted, it has no Display, and it is only read through
/// [`Secret::expose`], so it cannot reach a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(PocoError::BadSslMode(shorten(other))),
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
    /// Modes that may end up on an unencrypted connection.
    pub fn may_be_plaintext(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Name(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl TargetHost {
    /// The host as stored and as handed to the connector (IPv6 without brackets).
    pub fn as_string(&self) -> String {
        match self {
            TargetHost::Name(n) => n.clone(),
            TargetHost::V4(a) => a.to_string(),
            TargetHost::V6(a) => a.to_string(),
        }
    }
    /// The host as written in a URL authority (IPv6 in brackets).
    pub fn url_form(&self) -> String {
        match self {
            TargetHost::V6(a) => format!("[{a}]"),
            other => other.as_string(),
        }
    }
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            TargetHost::Name(_) => None,
            TargetHost::V4(a) => Some(IpAddr::V4(*a)),
            TargetHost::V6(a) => Some(IpAddr::V6(*a)),
        }
    }
}

/// A fully parsed target. Only the connection-relevant, validated pieces are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub host: TargetHost,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// Extra libpq parameters we honour (see [`EXTRA_PARAMS`]), already validated.
    pub params: BTreeMap<String, String>,
}

/// Parameters accepted besides host/port/user/password/dbname/sslmode. Anything else is
/// refused: it could change where or how we connect in a way we would silently ignore.
pub const EXTRA_PARAMS: &[&str] = &[
    "sslrootcert",
    "sslsni",
    "channel_binding",
    "options",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
];

/// Connection parameters libpq knows that we refuse with a specific reason.
const REFUSED_PARAMS: &[&str] = &[
    "hostaddr",
    "service",
    "passfile",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "requiressl",
    "requirepeer",
    "krbsrvname",
    "gsslib",
    "replication",
    "load_balance_hosts",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslcompression",
    "client_encoding",
];

/// Where a value came from, to say which two sources disagree.
#[derive(Default)]
struct Partial {
    host: Option<TargetHost>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<Secret>,
    dbname: Option<String>,
    sslmode: Option<SslMode>,
    params: BTreeMap<String, String>,
}

fn set_once<T: PartialEq>(slot: &mut Option<T>, v: T, what: &str) -> Result<()> {
    match slot {
        Some(old) if *old != v => Err(PocoError::Conflict(what.to_string())),
        _ => {
            *slot = Some(v);
            Ok(())
        }
    }
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(64).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

fn decode(s: &str) -> Result<String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| PocoError::BadUrl("percent-encoded text is not valid UTF-8".into()))
}

fn is_socket_path(h: &str) -> bool {
    h.starts_with('/') || h.starts_with('@') || h.starts_with('\\')
}

/// Canonicalise one host as given (URL host, `host=` parameter or PGHOST).
fn parse_host(raw: &str) -> Result<TargetHost> {
    let h = raw.trim();
    if h.is_empty() {
        return Err(PocoError::NoHost);
    }
    if is_socket_path(h) {
        return Err(PocoError::UnixSocket(shorten(h)));
    }
    if h.contains(',') {
        return Err(PocoError::SeveralHosts);
    }
    let unbracketed = h.strip_prefix('[').and_then(|x| x.strip_suffix(']'));
    if let Some(v6) = unbracketed.or(if h.contains(':') { Some(h) } else { None }) {
        // An IPv6 literal; a zone id (fe80::1%eth0) is link-local anyway and unparseable here.
        return v6
            .parse::<Ipv6Addr>()
            .map(TargetHost::V6)
            .map_err(|_| PocoError::BadUrl(format!("invalid IPv6 address \"{}\"", shorten(v6))));
    }
    let h = h.strip_suffix('.').unwrap_or(h);
    match url::Host::parse(h) {
        Ok(url::Host::Ipv4(a)) => Ok(TargetHost::V4(a)),
        Ok(url::Host::Ipv6(a)) => Ok(TargetHost::V6(a)),
        Ok(url::Host::Domain(d)) => {
            if d.is_empty() || d.split('.').any(|l| l.is_empty() || l.len() > 63) || d.len() > 253 {
                return Err(PocoError::BadUrl(format!(
                    "invalid host name \"{}\"",
                    shorten(h)
                )));
            }
            Ok(TargetHost::Name(d))
        }
        Err(_) => Err(PocoError::BadUrl(format!(
            "invalid host name \"{}\"",
            shorten(h)
        ))),
    }
}

fn parse_port(raw: &str) -> Result<u16> {
    let t = raw.trim();
    if t.contains(',') {
        return Err(PocoError::SeveralHosts);
    }
    match t.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) && !t.starts_with('+') => Ok(p as u16),
        _ => Err(PocoError::BadPort(shorten(t))),
    }
}

fn check_extra_param(k: &str, v: &str) -> Result<()> {
    let ok = match k {
        "sslsni" => matches!(v, "0" | "1"),
        "channel_binding" => matches!(v, "disable" | "prefer" | "require"),
        "connect_timeout" => v.parse::<u32>().map(|n| n <= 3600).unwrap_or(false),
        "target_session_attrs" => matches!(v, "any" | "read-write"),
        "sslrootcert" => !v.is_empty(),
        "application_name" => v.len() <= 63,
        "options" => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(PocoError::BadParameterValue(k.to_string()))
    }
}

impl Partial {
    /// Apply one key=value (URL query parameter); same-named duplicates must agree.
    fn apply_param(&mut self, k: &str, v: &str) -> Result<()> {
        match k {
            "host" => set_once(&mut self.host, parse_host(v)?, "the host"),
            "port" => set_once(&mut self.port, parse_port(v)?, "the port"),
            "user" => set_once(&mut self.user, v.to_string(), "the user"),
            "password" => set_once(&mut self.password, Secret::new(v), "the password"),
            "dbname" => set_once(&mut self.dbname, v.to_string(), "the database"),
            "sslmode" => set_once(&mut self.sslmode, SslMode::parse(v)?, "sslmode"),
            "gssencmode" => match v {
                // We never use GSSAPI encryption; "prefer" falls back to TLS, which is fine.
                "disable" | "prefer" => Ok(()),
                _ => Err(PocoError::BadParameterValue("gssencmode".into())),
            },
            k if EXTRA_PARAMS.contains(&k) => {
                check_extra_param(k, v)?;
                match self.params.get(k) {
                    Some(old) if old != v => Err(PocoError::Conflict(k.to_string())),
                    _ => {
                        self.params.insert(k.to_string(), v.to_string());
                        Ok(())
                    }
                }
            }
            k if REFUSED_PARAMS.contains(&k) => Err(PocoError::UnknownParameter(k.to_string())),
            other => Err(PocoError::UnknownParameter(shorten(other))),
        }
    }

    fn finish(self) -> Result<TargetSpec> {
        let host = self.host.ok_or(PocoError::NoHost)?;
        let user = match self.user {
            Some(u) if !u.is_empty() => u,
            _ => return Err(PocoError::NoUser),
        };
        let dbname = match self.dbname {
            Some(d) if !d.is_empty() => d,
            _ => user.clone(), // libpq's default: the database named like the user
        };
        Ok(TargetSpec {
            host,
            port: self.port.unwrap_or(5432),
            dbname,
            user,
            password: self.password.filter(|p| !p.expose().is_empty()),
            sslmode: self.sslmode.unwrap_or(SslMode::Require),
            params: self.params,
        })
    }
}

/// Parse a `postgresql://` or `postgres://` URL into `p`, refusing what we cannot honour.
fn parse_url_into(p: &mut Partial, input: &str) -> Result<()> {
    let s = input.trim();
    let lower = s.get(..13).unwrap_or(s).to_ascii_lowercase();
    let rest = if lower.starts_with("postgresql://") {
        &s[13..]
    } else if lower.starts_with("postgres://") {
        &s[11..]
    } else {
        return Err(PocoError::BadUrl(
            "it must start with postgresql:// or postgres://".into(),
        ));
    };
    // Look at the authority ourselves first: the url crate reads "h1:5432,h2" as a bad port
    // and we want to say "several hosts" instead.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let hostport = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    if hostport.contains(',') {
        return Err(PocoError::SeveralHosts);
    }
    // libpq allows an empty host part (`user@/db?host=...`, `user@:5432/db`); the url crate
    // does not when there is user info, so stand in a reserved name and treat it as absent.
    const NO_HOST: &str = "poco-no-host.invalid";
    let normalized = if hostport.is_empty() || hostport.starts_with(':') {
        let userinfo = &authority[..authority.len() - hostport.len()];
        format!(
            "postgresql://{userinfo}{NO_HOST}{hostport}{}",
            &rest[auth_end..]
        )
    } else {
        format!("postgresql://{rest}")
    };
    let url = url::Url::parse(&normalized).map_err(|e| match e {
        url::ParseError::InvalidPort => {
            let port = hostport.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
            PocoError::BadPort(shorten(port))
        }
        url::ParseError::EmptyHost => PocoError::NoHost,
        other => PocoError::BadUrl(other.to_string()),
    })?;
    if url.fragment().is_some() {
        return Err(PocoError::BadUrl(
            "a URL fragment (#...) is not allowed".into(),
        ));
    }
    if !url.username().is_empty() {
        p.user = Some(decode(url.username())?);
    }
    if let Some(pw) = url.password() {
        p.password = Some(Secret::new(decode(pw)?));
    }
    match url.host() {
        None => {}
        Some(url::Host::Domain(d)) if d.is_empty() || d == NO_HOST => {}
        Some(url::Host::Domain(d)) => p.host = Some(parse_host(&decode(d)?)?),
        Some(url::Host::Ipv4(a)) => p.host = Some(TargetHost::V4(a)),
        Some(url::Host::Ipv6(a)) => p.host = Some(TargetHost::V6(a)),
    }
    if let Some(port) = url.port() {
        p.port = Some(parse_port(&port.to_string())?);
    }
    let path = url.path();
    let db = path.strip_prefix('/').unwrap_or(path);
    // A bare '@' in the database part is user info in the wrong place (`postgresql:///user:pw@
    // host`: with three slashes libpq reads all of it as the database name). Taking it as a
    // name would store a password where names are shown; a real '@' in a name is written %40.
    if db.contains('@') {
        return Err(PocoError::BadUrl(
            "the database name holds a bare '@': user:password@host must come right after postgresql:// (two slashes); write a real '@' in a database name as %40".into(),
        ));
    }
    if !db.is_empty() {
        let db = decode(db)?;
        if db.contains('/') {
            return Err(PocoError::BadUrl(
                "the path must be a single database name".into(),
            ));
        }
        p.dbname = Some(db);
    }
    if let Some(q) = url.query() {
        // Split by hand: libpq does not treat '+' as a space, form decoding would.
        for pair in q.split('&').filter(|x| !x.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            p.apply_param(&decode(k)?, &decode(v)?)?;
        }
    }
    Ok(())
}

/// Parse a target given as a URL string.
pub fn parse_url(input: &str) -> Result<TargetSpec> {
    let mut p = Partial::default();
    parse_url_into(&mut p, input)?;
    p.finish()
}

/// The keys a jsonb target may hold (libpq's environment variable names, and a URL).
pub const JSON_TARGET_KEYS: &[&str] = &[
    "DATABASE_URL",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSSLMODE",
];
/// Parse a target given as a JSON object (`DATABASE_URL`, `PGHOST`, `PGPORT`, `PGUSER`,
/// `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`). Where the URL and a key both give a value, they
/// must agree. A JSON string holding a URL is accepted too.
pub fn parse_json(v: &Value) -> Result<TargetSpec> {
    let obj = match v {
        Value::String(s) => return parse_url(s),
        Value::Object(o) => o,
        _ => return Err(PocoError::BadJsonShape),
    };
    let get = |k: &str| -> Result<Option<String>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if k == "PGPORT" => Ok(Some(n.to_string())),
            Some(_) => Err(PocoError::BadJsonValue(k.to_string())),
        }
    };
    for k in obj.keys() {
        if !JSON_TARGET_KEYS.contains(&k.as_str()) {
            return Err(PocoError::UnknownJsonKey(shorten(k)));
        }
    }
    let mut p = Partial::default();
    if let Some(u) = get("DATABASE_URL")? {
        parse_url_into(&mut p, &u)?;
    }
    if let Some(h) = get("PGHOST")? {
        set_once(&mut p.host, parse_host(&h)?, "the host")?;
    }
    if let Some(port) = get("PGPORT")? {
        set_once(&mut p.port, parse_port(&port)?, "the port")?;
    }
    if let Some(u) = get("PGUSER")? {
        set_once(&mut p.user, u, "the user")?;
    }
    if let Some(pw) = get("PGPASSWORD")? {
        set_once(&mut p.password, Secret::new(pw), "the password")?;
    }
    if let Some(d) = get("PGDATABASE")? {
        set_once(&mut p.dbname, d, "the database")?;
    }
    if let Some(m) = get("PGSSLMODE")? {
        set_once(&mut p.sslmode, SslMode::parse(&m)?, "sslmode")?;
    }
    p.finish()
}

/// Why an address may not be a target unless private targets are allowed; `None` if public.
pub fn classify_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a.is_loopback() {
        Some("loopback")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if o[0] == 0 {
        Some("\"this network\" (0.0.0.0/8)")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (carrier-grade NAT)")
    } else if a.is_multicast() {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else {
        None
    }
}

fn classify_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_loopback() {
        return Some("loopback");
    }
    if a.is_unspecified() {
        return Some("unspecified");
    }
    // Addresses that carry an IPv4 address: judge the IPv4 address.
    if let Some(v4) = a.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[0..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible (deprecated) ::a.b.c.d
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return classify_v4(v4).or(Some("IPv4-compatible"));
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return classify_v4(v4);
    }
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return classify_v4(v4);
    }
    if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (private)")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local")
    } else if (s[0] & 0xff00) == 0xff00 {
        Some("multicast")
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Some("documentation")
    } else {
        None
    }
}

/// Names that only resolve on the local machine or network.
fn classify_name(n: &str) -> Option<&'static str> {
    let n = n.to_ascii_lowercase();
    if n == "localhost" || n.ends_with(".localhost") {
        Some("loopback")
    } else if n.ends_with(".local") {
        Some("link-local (mDNS)")
    } else if [".internal", ".lan", ".home.arpa", ".intranet", ".corp"]
        .iter()
        .any(|s| n.ends_with(s))
    {
        Some("private-network")
    } else if !n.contains('.') {
        Some("single-label (local network)")
    } else {
        None
    }
}

impl TargetSpec {
    /// Rebuild a spec from a stored catalog row (the password is not part of it).
    pub fn from_stored(
        host: &str,
        port: i32,
        dbname: &str,
        user: &str,
        sslmode: &str,
        params: BTreeMap<String, String>,
    ) -> Result<TargetSpec> {
        Ok(TargetSpec {
            host: parse_host(host)?,
            port: u16::try_from(port).map_err(|_| PocoError::BadPort(port.to_string()))?,
            dbname: dbname.to_string(),
            user: user.to_string(),
            password: None,
            sslmode: SslMode::parse(sslmode)?,
            params,
        })
    }

    /// The policy checks that depend on `poco.allow_private_targets`. Host names are checked
    /// for local-only names here; their resolved addresses are checked again at connect time.
    pub fn validate(&self, allow_private: bool) -> Result<()> {
        if allow_private {
            return Ok(());
        }
        if self.sslmode.may_be_plaintext() {
            return Err(PocoError::PlaintextRefused(self.sslmode.as_str().into()));
        }
        let why = match &self.host {
            TargetHost::Name(n) => classify_name(n),
            other => classify_ip(other.ip().expect("an IP host")),
        };
        match why {
            Some(kind) => Err(PocoError::PrivateAddress(self.host.as_string(), kind)),
            None => Ok(()),
        }
    }

    /// The sslrootcert parameter, if any, names a file inside `dir` (poco.ssl_root_cert_dir):
    /// checked by its text when the target is stored, and again (resolved, opened without
    /// blocking, bounded in size) when a job connects (src/net.rs).
    pub fn check_root_cert(&self, dir: Option<&str>) -> Result<()> {
        match self.params.get("sslrootcert") {
            None => Ok(()),
            Some(p) if p == "system" => Ok(()),
            Some(p) => root_cert_in(p, dir),
        }
    }

    /// A URL safe to show anywhere: the password replaced by `***` if there is one.
    pub fn redacted_url(&self) -> String {
        const USERINFO: &AsciiSet = &CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'#')
            .add(b'%')
            .add(b'/')
            .add(b':')
            .add(b'<')
            .add(b'>')
            .add(b'?')
            .add(b'@')
            .add(b'[')
            .add(b'\\')
            .add(b']')
            .add(b'^')
            .add(b'`')
            .add(b'{')
            .add(b'|')
            .add(b'}')
            .add(b'&')
            .add(b'=')
            .add(b'+');
        let user = utf8_percent_encode(&self.user, USERINFO);
        let pw = if self.password.is_some() { ":***" } else { "" };
        let db = utf8_percent_encode(&self.dbname, USERINFO);
        let mut s = format!(
            "postgresql://{user}{pw}@{}:{}/{db}?sslmode={}",
            self.host.url_form(),
            self.port,
            self.sslmode.as_str()
        );
        for (k, v) in &self.params {
            s.push('&');
            s.push_str(k);
            s.push('=');
            s.push_str(&utf8_percent_encode(v, USERINFO).to_string());
        }
        s
    }

    /// Associated data that binds a ciphertext to one target row and to where it connects:
    /// a ciphertext copied to another row, or a row edited to point elsewhere, fails to decrypt.
    pub fn associated_data(&self, target_id: i64, parent_key: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for part in [
            "poco_sync/target/v1",
            &target_id.to_string(),
            parent_key,
            &self.host.as_string(),
            &self.port.to_string(),
            &self.dbname,
            &self.user,
        ] {
            v.extend_from_slice(&(part.len() as u32).to_be_bytes());
            v.extend_from_slice(part.as_bytes());
        }
        v
    }
}

/// Replace every occurrence of each secret in `msg` by `***` (for text from other libraries,
/// such as a server's error message, before it goes anywhere).
pub fn mask_secrets(msg: &str, secrets: &[&str]) -> String {
    let mut out = msg.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(*s, "***");
    }
    out
}

/// Largest sslrootcert file read (a bundle of every public root is about 200 kB).
pub const ROOT_CERT_MAX: u64 = 1 << 20;

/// `path` is an absolute path inside `dir`, without `.` or `..` steps.
pub fn root_cert_in(path: &str, dir: Option<&str>) -> Result<()> {
    use std::path::{Component, Path};
    let hint_dir = "A target's sslrootcert may only name a file in the directory a superuser set as poco.ssl_root_cert_dir; sslrootcert=system uses the server's trusted roots.";
    let Some(dir) = dir.filter(|d| !d.is_empty()) else {
        return Err(crate::scope::scope_err(
            crate::SqlState::InsufficientPrivilege,
            format!("sslrootcert \"{path}\" names a file, and poco.ssl_root_cert_dir is not set"),
            hint_dir,
        ));
    };
    let p = Path::new(path);
    let clean = p.is_absolute()
        && !p
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
    if !clean || !p.starts_with(dir) || p == Path::new(dir) {
        return Err(crate::scope::scope_err(
            crate::SqlState::InsufficientPrivilege,
            format!("sslrootcert \"{path}\" is not a file inside poco.ssl_root_cert_dir ({dir})"),
            hint_dir,
        ));
    }
    Ok(())
}
