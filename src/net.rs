//! Connections to learners: tokio-postgres over rustls (ring provider), with libpq's sslmode
//! meanings, the private-address check done on the resolved address (not only the name), and a
//! timeout on every network operation. Runs on the worker's current-thread runtime.

use poco_core::learner::transient_sqlstate;
use poco_core::target::{classify_ip, SslMode, TargetHost, TargetSpec};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::{ChannelBinding, SslMode as PgSslMode};
use crate::capped::{Capped, CappedTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why a job step failed: what the user sees, the SQLSTATE, and whether a retry may help.
#[derive(Debug, Clone)]
pub struct JobError {
    pub sqlstate: String,
    pub message: String,
    pub hint: Option<String>,
    pub transient: bool,
    /// Stopped by poco_cancel (or the worker's own stop): the only error that ends a job as
    /// `cancelled`. A learner's 57014 (its pg_cancel_backend, statement_timeout) or a network
    /// timeout is not one: those are transient.
    pub by_cancel: bool,
}

impl JobError {
    pub fn new(sqlstate: &str, message: impl Into<String>) -> Self {
        JobError {
            sqlstate: sqlstate.into(),
            message: message.into(),
            hint: None,
            transient: false,
            by_cancel: false,
        }
    }
    pub fn transient(sqlstate: &str, message: impl Into<String>) -> Self {
        JobError {
            transient: true,
            ..JobError::new(sqlstate, message)
        }
    }
    pub fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }
    /// The message with its SQLSTATE and hint, as continuous sync shows it in poco_status.
    pub fn describe(&self) -> String {
        match &self.hint {
            Some(h) => format!("{} (SQLSTATE {}) HINT: {h}", self.message, self.sqlstate),
            None => format!("{} (SQLSTATE {})", self.message, self.sqlstate),
        }
    }
    pub fn cancelled() -> Self {
        JobError {
            by_cancel: true,
            ..JobError::new("57014", "the push was cancelled")
        }
    }
    pub fn is_cancel(&self) -> bool {
        self.by_cancel
    }

    /// An error from the learner connection, prefixed with what we were doing. What the
    /// learner wrote (message, detail, hint: a hostile learner may write megabytes) is cut
    /// to LEARNER_TEXT_MAX characters each before it goes anywhere.
    pub fn learner(doing: &str, e: &tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let mut msg = format!("learner: {doing}: {}", cut(db.message(), LEARNER_TEXT_MAX));
            if let Some(d) = db.detail() {
                msg.push_str(&format!(" ({})", cut(d, LEARNER_TEXT_MAX)));
            }
            let mut je = JobError {
                transient: transient_sqlstate(code),
                ..JobError::new(code, msg)
            };
            je.hint = db
                .hint()
                .map(|h| cut(h, LEARNER_TEXT_MAX))
                .or_else(|| poco_core::learner::learner_hint(code).map(str::to_string));
            je
        } else {
            // I/O, closed connection, TLS or protocol trouble: a retry may succeed.
            JobError::transient(
                "08006",
                format!(
                    "learner: {doing}: {}",
                    cut(&with_sources(e), LEARNER_TEXT_MAX)
                ),
            )
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Longest text kept of what a learner wrote in an error (message, detail, hint).
pub const LEARNER_TEXT_MAX: usize = 500;

/// `s` cut to at most `max` characters, marked when cut.
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}… ({} more bytes)", &s[..i], s.len() - i),
    }
}

/// Run one network step with the configured timeout and the cancel check.
pub async fn step<T, F>(
    what: &str,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
    fut: F,
) -> Result<T, JobError>
where
    F: std::future::Future<Output = Result<T, JobError>>,
{
    tokio::pin!(fut);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(100));
        tokio::select! {
            r = &mut fut => return r,
            _ = tick => {
                if cancelled() {
                    return Err(JobError::cancelled());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(JobError::transient(
                        "57014",
                        format!("learner: {what}: no answer within {} ms (poco.network_timeout)", timeout.as_millis()),
                    ));
                }
            }
        }
    }
}

/// `step` for a task of its own on the runtime (not the main thread: no cancel check, the
/// stop signal is read there): the timeout only.
pub async fn step_bg<T, F>(what: &str, timeout: Duration, fut: F) -> Result<T, JobError>
where
    F: std::future::Future<Output = Result<T, JobError>>,
{
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(JobError::transient(
                "57014",
                format!(
                    "learner: {what}: no answer within {} ms (poco.network_timeout)",
                    timeout.as_millis()
                ),
            ))
        })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sslmode=require` (and allow/prefer): encrypt, verify nothing, as libpq does. The
/// handshake signature is still checked, so the session key belongs to the presented
/// certificate.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        e: &CertificateDer<'_>,
        i: &[CertificateDer<'_>],
        n: &ServerName<'_>,
        o: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(e, i, n, o, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Read an sslrootcert file without letting it hold up or flood the job: inside the allowed
/// directory once resolved (a symlink may not lead out), opened without blocking (a FIFO
/// would wait for a writer forever), a regular file, at most ROOT_CERT_MAX bytes (a device
/// such as /dev/zero never ends). Runs on a blocking thread of the runtime, with a timeout.
fn read_root_file(path: &str, dir: Option<&str>) -> Result<Vec<u8>, JobError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let max = poco_core::target::ROOT_CERT_MAX;
    let bad = |m: String| {
        JobError::new("42501", m).hint(
            "sslrootcert names a PEM file of at most 1 MB inside poco.ssl_root_cert_dir, readable by the server's operating-system user; or use sslrootcert=system.",
        )
    };
    poco_core::target::root_cert_in(path, dir).map_err(|e| bad(e.to_string()))?;
    let dir = dir.unwrap_or_default();
    let real = std::fs::canonicalize(path)
        .map_err(|e| bad(format!("cannot read sslrootcert \"{path}\": {e}")))?;
    let real_dir = std::fs::canonicalize(dir)
        .map_err(|e| bad(format!("cannot read poco.ssl_root_cert_dir \"{dir}\": {e}")))?;
    if !real.starts_with(&real_dir) {
        return Err(bad(format!(
            "sslrootcert \"{path}\" leads out of poco.ssl_root_cert_dir (to {})",
            real.display()
        )));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&real)
        .map_err(|e| bad(format!("cannot open sslrootcert \"{path}\": {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot read sslrootcert \"{path}\": {e}")))?;
    if !meta.is_file() {
        return Err(bad(format!("sslrootcert \"{path}\" is not a regular file")));
    }
    if meta.len() > max {
        return Err(bad(format!(
            "sslrootcert \"{path}\" is larger than {} kB ({} bytes)",
            max / 1024,
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("cannot read sslrootcert \"{path}\": {e}")))?;
    if bytes.len() as u64 > max {
        return Err(bad(format!(
            "sslrootcert \"{path}\" grew past {} kB while read",
            max / 1024
        )));
    }
    Ok(bytes)
}

async fn roots(spec: &TargetSpec, root_dir: Option<String>) -> Result<RootCertStore, JobError> {
    let mut store = RootCertStore::empty();
    match spec.params.get("sslrootcert").cloned() {
        Some(path) if path != "system" => {
            let p = path.clone();
            let bytes = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || read_root_file(&p, root_dir.as_deref())),
            )
            .await
            .map_err(|_| {
                JobError::new(
                    "58030",
                    format!("reading sslrootcert \"{path}\" took over 5 s"),
                )
            })?
            .map_err(|e| JobError::new("XX000", format!("reading sslrootcert: {e}")))??;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    JobError::new("22023", format!("sslrootcert \"{path}\" is not PEM: {e}"))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(JobError::new(
                    "22023",
                    format!("sslrootcert \"{path}\" holds no usable certificate"),
                ));
            }
        }
        _ => {
            let loaded = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(loaded.certs);
            if store.is_empty() {
                return Err(JobError::new("58P01", "no system root certificates found for sslmode=verify-*")
                    .hint("Install ca-certificates, or give sslrootcert=/path/to/root.crt in the target URL."));
            }
        }
    }
    Ok(store)
}

async fn tls(spec: &TargetSpec, root_dir: Option<String>) -> Result<MakeRustlsConnect, JobError> {
    let p = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match spec.sslmode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(spec, root_dir).await?),
                p.clone(),
            )
            .build()
            .map_err(|e| JobError::new("22023", format!("TLS roots: {e}")))?;
            if spec.sslmode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
        _ => Arc::new(EncryptOnly(p.clone())),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| JobError::new("XX000", format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // SNI goes with host names (Neon routes by it) unless sslsni=0.
    cfg.enable_sni = spec.params.get("sslsni").map(String::as_str) != Some("0");
    Ok(MakeRustlsConnect::new(cfg))
}

/// Resolve the target and check every address it gives before connecting: a public name that
/// resolves to a private address is as private as the address.
async fn resolve(
    spec: &TargetSpec,
    allow_private: bool,
    timeout: Duration,
) -> Result<Vec<IpAddr>, JobError> {
    let addrs: Vec<IpAddr> = match &spec.host {
        TargetHost::Name(name) => {
            let found =
                tokio::time::timeout(timeout, tokio::net::lookup_host((name.as_str(), spec.port)))
                    .await
                    .map_err(|_| {
                        JobError::transient("08001", format!("resolving \"{name}\" timed out"))
                    })?
                    .map_err(|e| {
                        JobError::transient("08001", format!("cannot resolve \"{name}\": {e}"))
                    })?;
            let mut v: Vec<IpAddr> = found.map(|a: SocketAddr| a.ip()).collect();
            v.dedup();
            v
        }
        other => vec![other.ip().expect("an IP host")],
    };
    if !allow_private {
        for ip in &addrs {
            if let Some(kind) = classify_ip(*ip) {
                return Err(JobError::new(
                    "42501",
                    format!("target host \"{}\" resolves to {ip}, a {kind} address", spec.host.as_string()),
                )
                .hint("Learner databases must be on public addresses; poco.allow_private_targets = on allows others (development only)."));
            }
        }
    }
    if addrs.is_empty() {
        return Err(JobError::transient(
            "08001",
            format!("\"{}\" resolves to no address", spec.host.as_string()),
        ));
    }
    Ok(addrs)
}

/// Connect to the learner. The connection task is spawned on the current runtime; it is
/// driven whenever the worker blocks on a network step.
pub async fn connect(
    spec: &TargetSpec,
    password: Option<&str>,
    allow_private: bool,
    root_dir: Option<String>,
    timeout: Duration,
    application_name: &str,
) -> Result<tokio_postgres::Client, JobError> {
    let addrs = resolve(spec, allow_private, timeout).await?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.port(spec.port)
        .user(&spec.user)
        .dbname(&spec.dbname)
        .application_name(application_name);
    if let Some(pw) = password {
        cfg.password(pw);
    }
    let connect_timeout = spec
        .params
        .get("connect_timeout")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(|s| Duration::from_secs(s.max(2)).min(timeout))
        .unwrap_or(timeout);
    if let Some(o) = spec.params.get("options") {
        cfg.options(o);
    }
    cfg.channel_binding(
        match spec.params.get("channel_binding").map(String::as_str) {
            Some("require") => ChannelBinding::Require,
            Some("disable") => ChannelBinding::Disable,
            _ => ChannelBinding::Prefer,
        },
    );
    cfg.ssl_mode(match spec.sslmode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    let mut tls = tls(spec, root_dir).await?;
    let wher = format!("{}:{}", spec.host.as_string(), spec.port);
    // The socket is opened here (not by tokio-postgres) so that what the learner sends is
    // read through the caps (capped.rs), on the socket and inside TLS.
    let mut socket = None;
    let mut failure = String::new();
    for ip in &addrs {
        match tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect(SocketAddr::new(*ip, spec.port)),
        )
        .await
        {
            Ok(Ok(s)) => {
                socket = Some(s);
                break;
            }
            Ok(Err(e)) => failure = format!("error connecting to server: {e}"),
            Err(_) => failure = format!("connecting to {wher} timed out"),
        }
    }
    let Some(socket) = socket else {
        return Err(JobError::transient(
            "08001",
            format!("cannot connect to learner {wher}: {failure}"),
        ));
    };
    let _ = socket.set_nodelay(true);
    let _ = socket2::SockRef::from(&socket)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)));
    let ssl_answer = spec.sslmode != SslMode::Disable;
    let connector = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
        Capped<tokio::net::TcpStream>,
    >>::make_tls_connect(&mut tls, &spec.host.as_string())
    .map_err(|e| JobError::new("08001", format!("learner {wher}: TLS setup: {e}")))?;
    let (client, conn) = tokio::time::timeout(
        timeout,
        cfg.connect_raw(Capped::new(socket, ssl_answer), CappedTls(connector)),
    )
    .await
        .map_err(|_| {
            JobError::transient(
                "08001",
                format!(
                    "connecting to {}:{} timed out",
                    spec.host.as_string(),
                    spec.port
                ),
            )
        })?
        .map_err(|e| connect_error(spec, &e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn connect_error(spec: &TargetSpec, e: &tokio_postgres::Error) -> JobError {
    let wher = format!("{}:{}", spec.host.as_string(), spec.port);
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let mut je = JobError::new(
            code,
            format!(
                "learner {wher} refused the connection: {}",
                cut(db.message(), LEARNER_TEXT_MAX)
            ),
        );
        je.transient = transient_sqlstate(code);
        je.hint = db.hint().map(|h| cut(h, LEARNER_TEXT_MAX));
        if code == "28P01" || code == "28000" {
            je.hint = Some("Check the user and password of the target (poco_add_target again with the right URL).".into());
        }
        return je;
    }
    let text = cut(&with_sources(e), LEARNER_TEXT_MAX);
    let lower = text.to_lowercase();
    if lower.contains("server does not support tls")
        || lower.contains("server does not support ssl")
    {
        return JobError::new("08001", format!("learner {wher} does not offer TLS, and sslmode={} requires it", spec.sslmode.as_str()))
            .hint("Enable ssl on the learner server, or (development only) use sslmode=disable with poco.allow_private_targets = on.");
    }
    if lower.contains("certificate")
        || lower.contains("invalidcertificate")
        || lower.contains("tls")
    {
        return JobError::new("08001", format!("learner {wher}: TLS verification failed (sslmode={}): {text}", spec.sslmode.as_str()))
            .hint("verify-full checks the certificate chain and the host name; verify-ca only the chain; require only encrypts.");
    }
    JobError::transient("08001", format!("cannot connect to learner {wher}: {text}"))
}

/// An error and its causes ("error performing TLS handshake: server does not support TLS").
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
