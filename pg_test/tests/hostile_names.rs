//! Hostile names and values through scope, push and continuous sync (issue #6): schema, table
//! and column names generated from quotes, semicolons, comment markers, dollar signs,
//! backslashes, percent signs, keywords, dots, parentheses, emoji, CJK, combining and
//! zero-width characters, up to the 63-byte limit; text values holding COPY's own markers
//! (`\N`, `\.`, tabs, newlines, backslashes). For each generated schema one family is pushed,
//! another synced through inserts, updates and deletes of every table; both learners must
//! equal their scope by the history checker. POCO_HOSTILE_SEED / POCO_HOSTILE_SCHEMAS replay.

use poco_e2e::{check_learner, learner, Options, Rng, Server};

const FRAGMENTS: &[&str] = &[
    "Ünï",
    "日本語",
    "🦀",
    "\"",
    "'",
    ";",
    " ",
    "--",
    "/*",
    "*/",
    "$1",
    "$$",
    "\\",
    "%s",
    "%I",
    "select",
    "Table",
    "a.b",
    "(",
    ")",
    "ǅ",
    "\u{200B}",
    "e\u{301}",
    "ß",
    "İ",
    "NULL",
    ",",
    "=",
    "\t",
];

const VALUES: &[&str] = &[
    "\\N",
    "\\.",
    "a\tb",
    "line\nbreak",
    "back\\slash",
    "quote'd",
    "dq\"",
    "🦀 crab",
    "",
    " ",
    "NULL",
    "\\\\N",
    "e\u{301}",
    "日本語",
    "$1",
    "%s",
    "\r\n",
    "--",
    "';DROP TABLE x;--",
];

/// A quoted identifier.
fn qi(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A name: a unique prefix, then random fragments; cut to at most 63 bytes on a character
/// boundary, and sometimes padded to exactly 63.
fn name(r: &mut Rng, unique: &str) -> String {
    let mut s = unique.to_string();
    for _ in 0..r.range(1, 6) {
        s.push_str(FRAGMENTS[r.below(FRAGMENTS.len())]);
    }
    if r.chance(30) {
        while s.len() < 63 {
            s.push(if s.len() <= 61 && r.chance(50) {
                'é'
            } else {
                'x'
            });
        }
    }
    while s.len() > 63 {
        s.pop();
    }
    s
}

fn value(r: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..r.range(1, 4) {
        s.push_str(VALUES[r.below(VALUES.len())]);
    }
    lit(&s)
}

struct Names {
    schema: String,
    root: String,
    owned: String,
    grand: String,
    reference: String,
    /// id, name, secret (excluded), owner key, owned value, ref key, grand key part, json
    cols: [String; 8],
}

impl Names {
    fn gen(r: &mut Rng, k: usize) -> Names {
        Names {
            schema: name(r, &format!("s{k}")),
            root: name(r, "r"),
            owned: name(r, "o"),
            grand: name(r, "g"),
            reference: name(r, "f"),
            cols: [
                name(r, "c0"),
                name(r, "c1"),
                name(r, "c2"),
                name(r, "c3"),
                name(r, "c4"),
                name(r, "c5"),
                name(r, "c6"),
                name(r, "c7"),
            ],
        }
    }
    fn rel(&self, t: &str) -> String {
        format!("{}.{}", qi(&self.schema), qi(t))
    }
    fn regclass(&self, t: &str) -> String {
        lit(&self.rel(t))
    }
    fn ddl(&self) -> String {
        let c: Vec<String> = self.cols.iter().map(|c| qi(c)).collect();
        format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {f} ({id} bigint PRIMARY KEY, {name} text);
             CREATE TABLE {r} ({id} bigint PRIMARY KEY, {name} text NOT NULL, {secret} text);
             CREATE TABLE {o} ({id} bigint PRIMARY KEY, {owner} bigint NOT NULL REFERENCES {r}, {val} text, {rk} bigint REFERENCES {f});
             CREATE TABLE {g} ({owner} bigint REFERENCES {o} ON DELETE CASCADE, {part} int, {json} jsonb, {val} text, PRIMARY KEY ({owner}, {part}));",
            s = qi(&self.schema),
            f = self.rel(&self.reference),
            r = self.rel(&self.root),
            o = self.rel(&self.owned),
            g = self.rel(&self.grand),
            id = c[0],
            name = c[1],
            secret = c[2],
            owner = c[3],
            val = c[4],
            rk = c[5],
            part = c[6],
            json = c[7],
        )
    }
}

/// Random changes of family `fam` in every table (ids above 1000 are new ones).
fn changes(r: &mut Rng, n: &Names, fam: i64, next: &mut i64) -> String {
    let c: Vec<String> = n.cols.iter().map(|c| qi(c)).collect();
    let (o, g, f, root) = (
        n.rel(&n.owned),
        n.rel(&n.grand),
        n.rel(&n.reference),
        n.rel(&n.root),
    );
    let mut stmts = Vec::new();
    for _ in 0..r.range(2, 6) {
        *next += 1;
        let id = *next;
        stmts.push(match r.below(7) {
            0 | 1 => format!(
                "INSERT INTO {o} ({}, {}, {}, {}) VALUES ({id}, {fam}, {}, {})",
                c[0], c[3], c[4], c[5], value(r), 1 + r.below(5)
            ),
            2 => format!(
                "INSERT INTO {g} ({}, {}, {}, {}) SELECT {}, {id}, jsonb_build_object({}, {}), {} FROM {o} WHERE {} = {fam} ORDER BY random() LIMIT 1",
                c[3], c[6], c[7], c[4], c[0], value(r), value(r), value(r), c[3]
            ),
            3 => format!(
                "UPDATE {o} SET {} = {} WHERE {} IN (SELECT {} FROM {o} WHERE {} = {fam} ORDER BY random() LIMIT 2)",
                c[4], value(r), c[0], c[0], c[3]
            ),
            4 => format!(
                "DELETE FROM {o} WHERE {} = (SELECT {} FROM {o} WHERE {} = {fam} ORDER BY random() LIMIT 1)",
                c[0], c[0], c[3]
            ),
            5 => format!("UPDATE {root} SET {} = {} WHERE {} = {fam}", c[1], value(r), c[0]),
            _ => format!("UPDATE {f} SET {} = {} WHERE {} = {}", c[1], value(r), c[0], 1 + r.below(5)),
        });
    }
    stmts.join(";\n")
}

#[test]
fn hostile_names_and_values_go_through_scope_push_and_sync() {
    let seed: u64 = poco_e2e::env_or("POCO_HOSTILE_SEED", 0x4057_11e);
    let schemas: usize = poco_e2e::env_or("POCO_HOSTILE_SCHEMAS", 3);
    println!("hostile_names: seed {seed}, {schemas} schemas");
    let mut r = Rng(seed);
    for k in 0..schemas {
        // A platform of its own for each schema (one scope root per database).
        let platform = Server::start(&format!("hostile{k}"), &Options::platform_verbose());
        let db = platform.connect("platform");
        db.execute("ALTER SYSTEM SET poco.retry_delay = '100ms'");
        platform.reload();
        let n = Names::gen(&mut r, k);
        let c: Vec<String> = n.cols.iter().map(|c| qi(c)).collect();
        let what = format!("schema {k} (seed {seed})");
        db.execute(&n.ddl());
        // Three families, shared reference rows, hostile values everywhere.
        let mut data = vec![format!(
            "INSERT INTO {} SELECT g, 'ref ' || g FROM generate_series(1, 5) g",
            n.rel(&n.reference)
        )];
        for fam in 1..=3i64 {
            data.push(format!(
                "INSERT INTO {} VALUES ({fam}, {}, 'secret {fam}')",
                n.rel(&n.root),
                value(&mut r)
            ));
            for i in 0..4 {
                let id = fam * 100 + i;
                data.push(format!(
                    "INSERT INTO {} VALUES ({id}, {fam}, {}, {})",
                    n.rel(&n.owned),
                    value(&mut r),
                    1 + r.below(5)
                ));
                data.push(format!(
                    "INSERT INTO {} VALUES ({id}, 1, jsonb_build_object({}, {}), {})",
                    n.rel(&n.grand),
                    value(&mut r),
                    value(&mut r),
                    value(&mut r)
                ));
            }
        }
        db.execute(&data.join(";\n"));
        db.execute(&format!(
            "SELECT poco_scope_root({}, {}); SELECT poco_scope_exclude_column({}, {}); \
             SELECT poco_scope_table({}); SELECT poco_scope_table({}); SELECT poco_scope_reference({})",
            n.regclass(&n.root),
            lit(&format!("{} = $1", c[0])),
            n.regclass(&n.root),
            lit(&n.cols[2]),
            n.regclass(&n.owned),
            n.regclass(&n.grand),
            n.regclass(&n.reference),
        ));
        let preview: i64 = db.query("SELECT count(*) FROM poco_scope_preview(1)")[0].get(0);
        assert_eq!(preview, 4, "{what}: four tables in the scope");

        // Family 1 pushed, family 2 synced.
        let (lp, ls) = (
            learner(&format!("hostile_p{k}")),
            learner(&format!("hostile_s{k}")),
        );
        let job = poco_e2e::push_to_new_target(&db, "1", &lp);
        poco_e2e::assert_job_succeeds(&db, job, "1 min");
        let lpdb = lp.connect("family");
        let rep = check_learner(&db, &lpdb, "1");
        assert!(rep.clean() && rep.rows >= 10, "{what}, pushed: {rep:?}");
        assert_eq!(
            lpdb.value(&format!(
                "SELECT count(*) FROM information_schema.columns WHERE column_name = {}",
                lit(&n.cols[2])
            ))
            .as_deref(),
            Some("0"),
            "{what}: the excluded column stayed home"
        );
        let t = poco_e2e::enable_sync(&db, "2", &ls);
        let lsdb = ls.connect("family");
        let mut next = 10_000;
        for round in 0..6 {
            let body = changes(&mut r, &n, 2, &mut next);
            db.execute(&format!("BEGIN; {body}; COMMIT"));
            // Another family's changes too: they must not show.
            let other = changes(&mut r, &n, 3, &mut next);
            db.execute(&format!("BEGIN; {other}; COMMIT"));
            assert_eq!(
                db.value(&format!("SELECT poco_sync_wait({t}, '1 min')"))
                    .as_deref(),
                Some("t"),
                "{what}, round {round}"
            );
            let rep = check_learner(&db, &lsdb, "2");
            assert!(
                rep.clean() && rep.rows > 0,
                "{what}, synced, round {round}: {rep:?}"
            );
        }
        println!(
            "hostile_names: {what}: {:?} pushed and synced clean",
            n.schema
        );
        drop(db);
        poco_e2e::assert_secret_kept(&platform, &["poco_add_target(", "poco_enable_sync("]);
    }
}
