//! Test harness: throwaway PostgreSQL servers for end-to-end tests.
//!
//! Each [`Server`] gets its own temp directory and a free loopback port, is initialised and
//! run by a non-root OS user (initdb refuses root), listens on 127.0.0.1 only, and is
//! stopped (`-m immediate`) and deleted when dropped, also when the test panics.
//! A *platform* server has poco_sync preloaded, a key file and `poco.database = platform`;
//! a *learner* server is a plain PostgreSQL.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use tokio_postgres::error::DbError;
pub use tokio_postgres::Row;

mod watchdog;
pub use watchdog::watchdog_skips_verify;
mod flood;
pub use flood::{Flood, FloodServer};
mod proxy;
pub use proxy::FaultProxy;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The OS user that runs the servers when the tests run as root.
pub fn test_user() -> String {
    std::env::var("POCO_TEST_USER").unwrap_or_else(|_| "poco".into())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

pub fn bindir() -> PathBuf {
    let pg_config = std::env::var("POCO_PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .expect("pg_config");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Run a server binary as the test user.
fn run_as_user(bin: &Path, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg(test_user()).arg("--").arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("run server binary")
}

fn check(out: Output, what: &str) -> String {
    if !out.status.success() {
        panic!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chown_to_test_user(p: &Path) {
    if is_root() {
        let st = Command::new("chown")
            .arg("-R")
            .arg(test_user())
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success(), "chown {p:?}");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 32-byte key as 64 hex digits, different for every seed.
pub fn hex_key(seed: u8) -> String {
    (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(31).wrapping_add(seed)))
        .collect()
}

#[derive(Clone)]
pub struct Options {
    pub preload: bool,
    /// Key file contents (`None`: poco.key_file is not set).
    pub key: Option<String>,
    pub allow_private: bool,
    pub extra_conf: Vec<String>,
    /// Create database `platform` and `CREATE EXTENSION poco_sync` in it.
    pub create_extension: bool,
}

impl Options {
    pub fn platform() -> Options {
        Options {
            preload: true,
            key: Some(hex_key(1)),
            allow_private: true,
            extra_conf: vec![],
            create_extension: true,
        }
    }
    /// `platform()` with every logging setting at its most verbose and pg_stat_statements
    /// tracking every statement: for the scenarios that end with `assert_secret_kept`.
    pub fn platform_verbose() -> Options {
        Options {
            extra_conf: verbose_logging(),
            ..Options::platform()
        }
    }
    pub fn learner() -> Options {
        Options {
            preload: false,
            key: None,
            allow_private: false,
            extra_conf: vec![],
            create_extension: false,
        }
    }
}

pub struct Server {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
    /// poco_sync is preloaded: the watchdog checks it when it is dropped (watchdog.rs).
    platform: bool,
    /// Handed over to the watchdog (a learner dropped while a platform lives): stopped later.
    handed_off: bool,
}

impl Server {
    pub fn start(name: &str, opts: &Options) -> Server {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("poco_e2e_{}_{}_{n}", name, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown_to_test_user(&dir);
        let bindir = bindir();
        let data = dir.join("data");
        check(
            run_as_user(
                &bindir.join("initdb"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            ),
            "initdb",
        );
        let mut server = Server {
            name: name.into(),
            dir: dir.clone(),
            port: 0,
            bindir,
            platform: opts.preload,
            handed_off: false,
        };
        if opts.preload {
            watchdog::platform_started();
        }
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "fsync = off".into(),
            "log_line_prefix = '%m [%p] %b '".into(),
        ];
        if opts.preload {
            conf.push("shared_preload_libraries = 'poco_sync'".into());
            conf.push("poco.database = 'platform'".into());
        }
        if let Some(k) = &opts.key {
            server.write_key_file("key", k);
            conf.push(format!("poco.key_file = '{}'", dir.join("key").display()));
        }
        if opts.allow_private {
            conf.push("poco.allow_private_targets = on".into());
        }
        conf.extend(opts.extra_conf.iter().cloned());
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str("\n# poco_sync test harness\n");
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text).unwrap();
        // The port is chosen right before start; retry if another process took it meanwhile.
        for attempt in 0..5 {
            server.port = free_port();
            if server.pg_ctl_start().is_ok() {
                break;
            }
            assert!(attempt < 4, "could not start {name}: {}", server.log());
        }
        if opts.create_extension {
            server.psql("postgres", "CREATE DATABASE platform");
            server.psql("platform", "CREATE EXTENSION poco_sync");
        }
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Write a key file owned by the server's user with mode 0600; returns its path.
    pub fn write_key_file(&self, name: &str, contents: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.join(name);
        std::fs::write(&p, contents).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_to_test_user(&p);
        p
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let out = run_as_user(
            &self.bindir.join("pg_ctl"),
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                self.data_dir().to_str().unwrap(),
                "-l",
                self.log_path().to_str().unwrap(),
                "-o",
                &format!("-p {}", self.port),
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn start_again(&self) {
        self.pg_ctl_start()
            .unwrap_or_else(|e| panic!("restart {}: {e}\n{}", self.name, self.log()));
    }

    /// `pg_ctl stop -m <mode>`; returns how long it took.
    pub fn stop(&self, mode: &str) -> Duration {
        let t = Instant::now();
        let _ = run_as_user(
            &self.bindir.join("pg_ctl"),
            &[
                "stop",
                "-w",
                "-t",
                "60",
                "-m",
                mode,
                "-D",
                self.data_dir().to_str().unwrap(),
            ],
        );
        t.elapsed()
    }

    pub fn reload(&self) {
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
            self.port
        )
    }

    /// A URL for this server as a poco target (plaintext: test servers have no TLS).
    pub fn target_url(&self, db: &str, user: &str, password: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Run SQL with psql (as the postgres superuser over TCP); panics on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.conninfo(db),
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        check(out, &format!("psql on {}: {}", self.name, redact(sql)))
            .trim()
            .to_string()
    }

    /// Run a server binary (pg_dump, pg_dumpall...) against this server; returns stdout.
    pub fn tool(&self, bin: &str, args: &[&str]) -> String {
        let out = Command::new(self.bindir.join(bin))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(args)
            .output()
            .unwrap();
        check(out, bin)
    }

    pub fn connect(&self, db: &str) -> Db {
        Db::connect(&self.conninfo(db))
    }

    /// Connect, or None while the server is not accepting connections (e.g. restarting).
    pub fn try_connect(&self, db: &str) -> Option<Db> {
        Db::try_connect(&self.conninfo(db)).ok()
    }

    /// Connect as another (non-superuser) role.
    pub fn connect_as(&self, user: &str, db: &str) -> Db {
        Db::connect(&self.conninfo_as(user, db))
    }

    pub fn conninfo_as(&self, user: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10",
            self.port
        )
    }

    pub fn postmaster_pid(&self) -> i32 {
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap();
        pidfile.lines().next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.handed_off {
            return;
        }
        if self.platform {
            watchdog::platform_dropped(self);
        } else if watchdog::hand_over(self) {
            self.handed_off = true;
            return;
        }
        self.stop("immediate");
        if std::env::var_os("POCO_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SQL as it may appear in test output: the password of any URL (`://user:PW@`) and any
/// `"PGPASSWORD": "..."` value replaced by `***`.
pub fn redact(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        let auth = &tail[..end];
        match (auth.rfind('@'), auth.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&auth[..=colon]);
                out.push_str("***");
                out.push_str(&auth[at..]);
            }
            _ => out.push_str(auth),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    let key = "\"PGPASSWORD\": \"";
    let mut res = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find(key) {
        res.push_str(&rest[..i + key.len()]);
        res.push_str("***");
        let after = &rest[i + key.len()..];
        rest = &after[after.find('"').unwrap_or(after.len())..];
    }
    res.push_str(rest);
    res
}

/// Collects the payloads of one channel's notifications in the background.
pub struct Listener {
    _rt: tokio::runtime::Runtime,
    _client: tokio_postgres::Client,
    pub rx: std::sync::mpsc::Receiver<String>,
}

/// LISTEN on `channel` over a connection of its own.
pub fn listen(conninfo: &str, channel: &str) -> Listener {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let client = rt.block_on(async {
        let (client, mut conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .unwrap();
        client
    });
    Listener {
        _rt: rt,
        _client: client,
        rx,
    }
}

/// A synchronous client over tokio-postgres, for tests.
pub struct Db {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Db {
    pub fn connect(conninfo: &str) -> Db {
        Db::try_connect(conninfo).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_connect(conninfo: &str) -> Result<Db, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connect {conninfo}: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, String>(client)
        })?;
        Ok(Db { rt, client })
    }

    pub fn query(&self, sql: &str) -> Vec<Row> {
        self.query_with(sql, &[])
    }

    /// A query's rows, or the server's message (no panic).
    pub fn try_query(&self, sql: &str) -> Result<Vec<Row>, String> {
        self.rt
            .block_on(self.client.query(sql, &[]))
            .map_err(|e| {
                e.as_db_error()
                    .map(|d| format!("{} ({})", d.message(), d.code().code()))
                    .unwrap_or(e.to_string())
            })
    }

    /// The first column of the first row as text, or the error (no panic).
    pub fn try_value(&self, sql: &str) -> Result<Option<String>, String> {
        let rows = self
            .rt
            .block_on(self.client.simple_query(sql))
            .map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
                _ => None,
            })
            .flatten())
    }

    /// A query with parameters; panics with the server's message on error.
    pub fn query_with(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<Row> {
        self.rt
            .block_on(self.client.query(sql, params))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {}",
                    redact(sql),
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or(e.to_string())
                )
            })
    }

    pub fn execute(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {}",
                    redact(sql),
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or(e.to_string())
                )
            });
    }

    /// The first column of the first row, as text (NULL as None).
    pub fn value(&self, sql: &str) -> Option<String> {
        let rows = self
            .rt
            .block_on(self.client.simple_query(sql))
            .unwrap_or_else(|e| panic!("{}: {e}", redact(sql)));
        rows.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })?
    }

    /// Run a statement that must fail; returns the server's error.
    pub fn error(&self, sql: &str) -> DbError {
        match self.rt.block_on(self.client.batch_execute(sql)) {
            Ok(()) => panic!("expected an error from: {}", redact(sql)),
            Err(e) => e
                .as_db_error()
                .cloned()
                .unwrap_or_else(|| panic!("{}: not a server error: {e}", redact(sql))),
        }
    }
}

/// A path inside the repository.
pub fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// A platform server with the sample schema, `parents` families and the sample scope (sample/).
pub fn sample_platform(name: &str, parents: u32) -> (Server, Db) {
    sample_platform_with(name, parents, &Options::platform())
}

/// `sample_platform` on a server started with `opts`.
pub fn sample_platform_with(name: &str, parents: u32, opts: &Options) -> (Server, Db) {
    let platform = Server::start(name, opts);
    for f in ["sample/schema.sql", "sample/data.sql", "sample/scope.sql"] {
        let out = platform.tool(
            "psql",
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                &format!("parents={parents}"),
                "-d",
                "platform",
                "-f",
                &repo(f),
            ],
        );
        assert!(!out.contains("ERROR"), "{f}: {out}");
    }
    let db = platform.connect("platform");
    (platform, db)
}

/// The learner password the scenarios' target URLs carry, looked for by `assert_secret_kept`
/// (test learners trust loopback connections, so any password logs in).
pub const SECRET: &str = "Qz7-learner-secret-Lm4";

/// Server settings for logging everything there is to log.
pub fn verbose_logging() -> Vec<String> {
    [
        "shared_preload_libraries = 'poco_sync, pg_stat_statements'",
        "pg_stat_statements.track = all",
        "log_min_messages = debug5",
        "log_min_error_statement = debug5",
        "log_error_verbosity = verbose",
        "log_statement = all",
        "log_connections = on",
        "log_disconnections = on",
    ]
    .map(String::from)
    .to_vec()
}

/// After a scenario: the learner password `SECRET` shows nowhere on the platform but in the
/// caller's own statements (a server log line holding it must hold one of `own`, such as
/// `"poco_enable_sync("`): not in any other log line (errors, panics, debug output), nor in
/// pg_stat_activity, pg_stat_statements, pg_settings, any table or view of schema poco,
/// poco_status of any parent, or `pg_dumpall`. The queries never hold it themselves. Returns
/// how many log lines held it (the caller's statements).
pub fn assert_secret_kept(platform: &Server, own: &[&str]) -> usize {
    let db = wait_for(Duration::from_secs(60), || platform.try_connect("platform"))
        .expect("the platform answers");
    let (a, b) = SECRET.split_at(5);
    let like = format!("'%' || '{a}' || '{b}' || '%'");
    let mut checks = vec![
        ("pg_stat_activity".to_string(), format!("SELECT count(*) FROM pg_stat_activity WHERE query LIKE {like}")),
        ("pg_settings".to_string(), format!("SELECT count(*) FROM pg_settings WHERE setting LIKE {like} OR reset_val LIKE {like} OR boot_val LIKE {like}")),
        ("poco_status".to_string(), format!("SELECT count(*) FROM (SELECT DISTINCT parent_id FROM poco.target) p, LATERAL poco_status(p.parent_id) s WHERE s::text LIKE {like}")),
    ];
    if db
        .value("SELECT count(*) FROM pg_settings WHERE name = 'pg_stat_statements.track'")
        .as_deref()
        == Some("1")
    {
        db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        checks.push((
            "pg_stat_statements".into(),
            format!("SELECT count(*) FROM pg_stat_statements WHERE query LIKE {like}"),
        ));
    }
    for r in db.query(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname = 'poco' AND c.relkind IN ('r', 'v', 'm') ORDER BY 1",
    ) {
        let rel: String = r.get(0);
        checks.push((rel.clone(), format!("SELECT count(*) FROM {rel} t WHERE t::text LIKE {like}")));
    }
    for (what, sql) in &checks {
        assert_eq!(
            db.value(sql).as_deref(),
            Some("0"),
            "the learner password shows in {what}"
        );
    }
    let dump = platform.tool("pg_dumpall", &[]);
    assert!(dump.contains("poco"), "pg_dumpall dumped the platform");
    assert!(
        !dump.contains(SECRET),
        "the learner password shows in pg_dumpall"
    );
    let mut seen = 0;
    for line in platform.log().lines().filter(|l| l.contains(SECRET)) {
        assert!(
            own.iter().any(|o| line.contains(o)),
            "the learner password in a server log line: {}",
            line.replace(SECRET, "<the password>")
        );
        seen += 1;
    }
    seen
}

/// Push `parent` to a new target, database `family` of `learner` (as its superuser, with the
/// password `SECRET`); the job id.
pub fn push_to_new_target(platform: &Db, parent: &str, learner: &Server) -> i64 {
    platform.query(&format!(
        "SELECT poco_push({parent}, poco_add_target({parent}, '{}'))",
        learner.target_url("family", "postgres", SECRET)
    ))[0]
        .get(0)
}

/// Turn on continuous sync of `parent` into database `family` of `learner` (as its
/// superuser) and wait for the first snapshot to succeed; the target id.
pub fn enable_sync(platform: &Db, parent: &str, learner: &Server) -> i64 {
    let url = learner.target_url("family", "postgres", SECRET);
    let t: i64 = platform.query(&format!("SELECT poco_enable_sync({parent}, '{url}')"))[0].get(0);
    let job: i64 = platform.query(&format!(
        "SELECT max(id) FROM poco.job WHERE target_id = {t}"
    ))[0]
        .get(0);
    assert_eq!(
        platform
            .value(&format!("SELECT poco_wait({job}, '1 min')"))
            .as_deref(),
        Some("succeeded"),
        "the first snapshot of parent {parent}"
    );
    t
}

/// Wait (`poco_wait`, at most `limit`) for push job `job` and assert it succeeded; a failure
/// names the job's error.
pub fn assert_job_succeeds(db: &Db, job: i64, limit: &str) {
    assert_eq!(
        db.value(&format!("SELECT poco_wait({job}, '{limit}')"))
            .as_deref(),
        Some("succeeded"),
        "job {job}: {:?}",
        db.value(&format!("SELECT error FROM poco.job WHERE id = {job}"))
    );
}

/// A change just committed reaches target `t` in time (the target is not held up by another):
/// `poco_sync_wait` returns true within `limit`, and `learner` shows user `id`'s display_name
/// as `want`.
pub fn assert_arrives(db: &Db, t: i64, learner: &Db, id: i64, want: &str, limit: Duration) {
    let t0 = Instant::now();
    let wait = format!(
        "SELECT poco_sync_wait({t}, '{} ms')",
        limit.as_millis() + 2000
    );
    assert_eq!(
        db.value(&wait).as_deref(),
        Some("t"),
        "{want}: target {t} held up"
    );
    assert!(t0.elapsed() < limit, "{want}: {:?}", t0.elapsed());
    assert_eq!(
        learner
            .value(&format!(
                "SELECT display_name FROM elearning.users WHERE id = {id}"
            ))
            .as_deref(),
        Some(want)
    );
}

/// A learner server with an empty database `family`.
pub fn learner(name: &str) -> Server {
    let s = Server::start(name, &Options::learner());
    s.psql("postgres", "CREATE DATABASE family");
    s
}

/// A learner server that logs every statement it receives: what a (hostile) learner could read
/// in its own logs, for the leak tests.
pub fn logging_learner(name: &str) -> Server {
    let s = Server::start(
        name,
        &Options {
            extra_conf: vec!["log_statement = all".into()],
            ..Options::learner()
        },
    );
    s.psql("postgres", "CREATE DATABASE family");
    s
}

/// Everything a learner could ever see of what the platform sent it: database `family`
/// dumped (schema and data) and everything its server logged (with `logging_learner`, every
/// statement it received, committed or not).
pub fn learner_view(l: &Server) -> String {
    let mut v = l.tool("pg_dump", &["-d", "family"]);
    v.push_str(&l.log());
    v
}

/// None of `markers` (values that must never leave the platform) shows in `seen`.
pub fn assert_absent(seen: &str, markers: &[String], what: &str) {
    let found: Vec<&String> = markers
        .iter()
        .filter(|m| !m.is_empty() && seen.contains(m.as_str()))
        .collect();
    assert!(
        found.is_empty(),
        "{what}: {} of {} values that must stay on the platform reached the learner, e.g. {:?}",
        found.len(),
        markers.len(),
        &found[..found.len().min(3)]
    );
}

/// The target's latest push job has ended; its state ('succeeded', 'failed', ...).
pub fn latest_job_result(db: &Db, target: i64) -> String {
    let job: i64 = db.query(&format!(
        "SELECT max(id) FROM poco.job WHERE target_id = {target}"
    ))[0]
        .get(0);
    db.value(&format!("SELECT poco_wait({job}, '2 min')"))
        .unwrap_or_default()
}

/// Wait until continuous target `t` streams again after a re-snapshot (its latest job ended
/// and its state is `streaming`); its state and last error otherwise, after `limit`.
pub fn wait_streaming(db: &Db, t: i64, limit: Duration) -> Result<(), String> {
    let mut last = String::new();
    let ok = wait_for(limit, || {
        last = db
            .value(&format!(
                "SELECT sync_state || ' ' || coalesce(last_sync_error, '-') FROM poco.target t WHERE id = {t} \
                   AND NOT EXISTS (SELECT 1 FROM poco.job j WHERE j.target_id = t.id AND j.state IN ('queued', 'running'))"
            ))
            .unwrap_or_else(|| "a job is queued or running".into());
        last.starts_with("streaming").then_some(())
    });
    ok.ok_or(last)
}

/// A process's private (anonymous) resident memory in kB, while it lives.
pub fn rss_anon_kb(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The environment variable `name` parsed (a test's scale or seed), or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Poll `f` every 100 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_url_and_json_passwords() {
        let sql = r#"SELECT poco_add_target(1, 'postgresql://u:Se:cr@t@127.0.0.1:5/d'), '{"PGPASSWORD": "pw1", "PGUSER": "x"}'"#;
        let r = super::redact(sql);
        assert!(!r.contains("Se:cr") && !r.contains("pw1"), "{r}");
        assert!(
            r.contains("postgresql://u:***@127.0.0.1:5/d") && r.contains(r#""PGPASSWORD": "***""#),
            "{r}"
        );
    }
}

/// What a learner holds against its parent's scope on the platform, row by row, keyed by
/// each table's primary key: `lost` (in the scope, not on the learner), `duplicated` (a key
/// more than once on the learner), `stale` (on both, different values; or on the learner
/// after it was deleted on the platform), `leaked` (on the learner, on the platform, but not
/// in this parent's scope: another family's or an admin's row).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub rows: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub stale: usize,
    pub leaked: usize,
    /// The first few differences, for the failure message.
    pub examples: Vec<String>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.stale == 0 && self.leaked == 0
    }
    fn note(&mut self, what: String) {
        if self.examples.len() < 5 {
            self.examples.push(what);
        }
    }
}

/// The recorded side of the history checker: the changes a test's writer recorded as
/// committed (each a value it inserted, such as an audit action) against what a learner (or
/// the platform) holds. `missing`: recorded as committed, not there; `duplicated`: there more
/// than once; `unexpected`: there, but neither committed nor in doubt (a statement whose
/// COMMIT got no answer, as when the server was killed, may or may not have committed).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct History {
    pub committed: usize,
    pub missing: usize,
    pub duplicated: usize,
    pub unexpected: usize,
}

impl History {
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.unexpected == 0
    }
}

/// `sql` lists the values on `db` (one text column); `committed` and `in_doubt` are what the
/// writer recorded.
pub fn check_history(
    db: &Db,
    sql: &str,
    committed: &std::collections::BTreeSet<String>,
    in_doubt: &std::collections::BTreeSet<String>,
) -> History {
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for r in db.query(sql) {
        *seen.entry(r.get::<_, String>(0)).or_default() += 1;
    }
    History {
        committed: committed.len(),
        missing: committed.iter().filter(|c| !seen.contains_key(*c)).count(),
        duplicated: seen.values().filter(|n| **n > 1).count(),
        unexpected: seen
            .keys()
            .filter(|v| !committed.contains(*v) && !in_doubt.contains(*v))
            .count(),
    }
}

/// The history checker: compare the learner with the parent's scope on the platform. Rows are
/// read as row_to_json: a json value stays as written (to_jsonb refuses `\u0000` in one).
pub fn check_learner(platform: &Db, learner: &Db, parent: &str) -> Report {
    use std::collections::BTreeMap;
    let mut report = Report::default();
    let tables = platform.query(
        "SELECT s.table_name, s.select_sql, \
                (SELECT coalesce(pg_catalog.array_agg(a.attname::text ORDER BY k.n), '{}') \
                   FROM pg_catalog.pg_index i \
                   CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY k(attnum, n) \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                  WHERE i.indrelid = s.table_name::regclass AND i.indisprimary) \
           FROM poco.scope_tables s ORDER BY s.table_name",
    );
    for t in &tables {
        let name: String = t.get(0);
        let sql: String = t.get(1);
        let pk: Vec<String> = t.get(2);
        let key = |row: &serde_json::Value| -> String {
            let k: Vec<String> = pk.iter().map(|c| row[c].to_string()).collect();
            k.join(",")
        };
        let rows = |db: &Db, q: &str, args: &[&(dyn tokio_postgres::types::ToSql + Sync)]| {
            db.query_with(q, args)
                .iter()
                .map(|r| serde_json::from_str::<serde_json::Value>(&r.get::<_, String>(0)).unwrap())
                .collect::<Vec<_>>()
        };
        let want: BTreeMap<String, serde_json::Value> = rows(
            platform,
            &format!("SELECT pg_catalog.row_to_json(s)::text FROM ({sql}) s"),
            &[&parent],
        )
        .into_iter()
        .map(|r| (key(&r), r))
        .collect();
        let everywhere: std::collections::BTreeSet<String> = rows(
            platform,
            &format!("SELECT pg_catalog.row_to_json(s)::text FROM {name} s"),
            &[],
        )
        .iter()
        .map(|r| key(r))
        .collect();
        let mut got: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for r in rows(
            learner,
            &format!("SELECT pg_catalog.row_to_json(s)::text FROM {name} s"),
            &[],
        ) {
            got.entry(key(&r)).or_default().push(r);
        }
        report.rows += want.len();
        for (k, w) in &want {
            match got.get(k) {
                None => {
                    report.lost += 1;
                    report.note(format!("{name} {k}: lost"));
                }
                Some(g) => {
                    if g.len() > 1 {
                        report.duplicated += g.len() - 1;
                        report.note(format!("{name} {k}: {} copies", g.len()));
                    }
                    if g[0] != *w {
                        report.stale += 1;
                        report.note(format!("{name} {k}: stale"));
                    }
                }
            }
        }
        for (k, g) in &got {
            if want.contains_key(k) {
                continue;
            }
            if everywhere.contains(k) {
                report.leaked += g.len();
                report.note(format!("{name} {k}: leaked (outside this parent's scope)"));
            } else {
                report.stale += g.len();
                report.note(format!("{name} {k}: stale (deleted on the platform)"));
            }
        }
    }
    report
}

/// Every scoped table of the learner equals the parent's scope on the platform, row by row
/// (the history checker finds nothing lost, duplicated, stale or leaked). Returns the rows.
pub fn assert_learner_equals_scope(platform: &Db, learner: &Db, parent: &str) -> usize {
    let report = check_learner(platform, learner, parent);
    assert!(report.clean(), "learner of parent {parent}: {report:?}");
    report.rows
}

/// A small seeded generator (splitmix64) for randomized tests: a seed replays a run.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}
