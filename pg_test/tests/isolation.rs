//! Randomized isolation: random schemas and random multi-tenant data, the scope declared through
//! the public SQL functions, and every parent's compiled rows compared with an independent
//! oracle that walks the generated rows in Rust (it never sees the compiled SQL).
//!
//! Shapes: chains of owned tables of any length, composite keys, undeclared link tables on the
//! ownership path, diamonds and second keys into the root (resolved with via), self-references
//! in the root, in owned tables and in reference tables, nullable keys holding NULLs, reference
//! tables referencing each other and pointing back into accounts, excluded columns, and table,
//! column and schema names that need quoting (mixed case, spaces, quotes, unicode, keywords).
//! Rows cross families: a row owned by one family points at another family's rows.
//!
//! POCO_ISOLATION_DATASETS (default 200) sets how many datasets; POCO_ISOLATION_SEED the first
//! seed. A failure names the seed, table and parent so that it can be replayed.

use poco_e2e::{Db, Options, Rng, Server};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum V {
    Null,
    Int(i64),
    Text(String),
}

impl V {
    fn sql(&self) -> String {
        match self {
            V::Null => "NULL".into(),
            V::Int(n) => n.to_string(),
            V::Text(s) => lit(s),
        }
    }
    fn text(&self) -> String {
        match self {
            V::Null => String::new(),
            V::Int(n) => n.to_string(),
            V::Text(s) => s.clone(),
        }
    }
}

fn qi(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Root,
    Owned,
    Link,
    Ref { all: bool },
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum FkKind {
    Owner,
    Cross,
    Ref,
    SelfRef,
    Author,
    RootParent,
}

struct Col {
    name: String,
    ty: &'static str,
}

struct Fk {
    name: String,
    cols: Vec<usize>,
    target: usize,
    tcols: Vec<usize>,
    kind: FkKind,
}

struct Tbl {
    name: String,
    kind: Kind,
    cols: Vec<Col>,
    pk: Vec<usize>,
    rid: usize,
    fks: Vec<Fk>,
    via: Option<String>,
    excluded: BTreeSet<usize>,
    rows: Vec<Vec<V>>,
}

impl Tbl {
    fn owner(&self) -> Option<&Fk> {
        self.fks.iter().find(|f| f.kind == FkKind::Owner)
    }
    fn scoped(&self) -> bool {
        self.kind != Kind::Link
    }
}

struct Dataset {
    seed: u64,
    schema: String,
    key_ty: &'static str,
    pred_with_parent: bool,
    tables: Vec<Tbl>,
    /// Root key values used as parent ids (plus one that does not exist).
    parents: Vec<V>,
}

const TABLE_NAMES: &[&str] = &[
    "users",
    "Lesson Progress",
    "élève",
    "Quiz\"Attempt",
    "select",
    "o'neil",
    "CamelCase",
    "with space",
    "日本語",
    "x.y",
    "order",
];
const COL_NAMES: &[&str] = &[
    "ref",
    "Owner",
    "from",
    "värde",
    "a\"b",
    "MiXeD",
    "with space",
    "user",
];

fn key_value(ty: &str, n: i64) -> V {
    match ty {
        "text" => V::Text(format!("k{n}")),
        "uuid" => V::Text(format!("00000000-0000-4000-8000-{n:012x}")),
        _ => V::Int(n),
    }
}

impl Dataset {
    fn generate(seed: u64) -> Dataset {
        let mut r = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66);
        let key_ty = ["integer", "bigint", "text", "uuid"][r.below(4)];
        let schema = if r.chance(50) {
            format!("iso {seed} Ä")
        } else {
            format!("iso_{seed}")
        };
        let mut tables: Vec<Tbl> = Vec::new();
        let mut col_counter = 0usize;
        let mut colname = |r: &mut Rng| {
            col_counter += 1;
            format!("{}{col_counter}", COL_NAMES[r.below(COL_NAMES.len())])
        };
        let tname =
            |r: &mut Rng, i: usize| format!("{} {i}", TABLE_NAMES[r.below(TABLE_NAMES.len())]);

        // Root: id, parent (self-reference), rid, payload.
        tables.push(Tbl {
            name: tname(&mut r, 0),
            kind: Kind::Root,
            cols: vec![
                Col {
                    name: "id".into(),
                    ty: key_ty,
                },
                Col {
                    name: "Parent Id".into(),
                    ty: key_ty,
                },
                Col {
                    name: "rid".into(),
                    ty: "integer",
                },
                Col {
                    name: colname(&mut r),
                    ty: "text",
                },
            ],
            pk: vec![0],
            rid: 2,
            fks: vec![Fk {
                name: "root parent".into(),
                cols: vec![1],
                target: 0,
                tcols: vec![0],
                kind: FkKind::RootParent,
            }],
            via: None,
            excluded: BTreeSet::new(),
            rows: vec![],
        });
        // Reference tables: id, rid, payload, maybe self, earlier-ref and author keys.
        let nref = r.range(1, 4);
        for i in 0..nref {
            let idx = tables.len();
            let mut t = Tbl {
                name: tname(&mut r, idx),
                kind: Kind::Ref { all: r.chance(25) },
                cols: vec![
                    Col {
                        name: "id".into(),
                        ty: "integer",
                    },
                    Col {
                        name: "rid".into(),
                        ty: "integer",
                    },
                    Col {
                        name: colname(&mut r),
                        ty: "text",
                    },
                ],
                pk: vec![0],
                rid: 1,
                fks: vec![],
                via: None,
                excluded: BTreeSet::new(),
                rows: vec![],
            };
            if r.chance(40) {
                t.cols.push(Col {
                    name: colname(&mut r),
                    ty: "integer",
                });
                t.fks.push(Fk {
                    name: format!("self ref {idx}"),
                    cols: vec![t.cols.len() - 1],
                    target: idx,
                    tcols: vec![0],
                    kind: FkKind::SelfRef,
                });
            }
            if i > 0 && r.chance(60) {
                let target = 1 + r.below(i);
                t.cols.push(Col {
                    name: colname(&mut r),
                    ty: "integer",
                });
                t.fks.push(Fk {
                    name: format!("ref {idx}→{target}"),
                    cols: vec![t.cols.len() - 1],
                    target,
                    tcols: vec![0],
                    kind: FkKind::Ref,
                });
            }
            if r.chance(40) {
                t.cols.push(Col {
                    name: colname(&mut r),
                    ty: key_ty,
                });
                t.fks.push(Fk {
                    name: format!("author {idx}"),
                    cols: vec![t.cols.len() - 1],
                    target: 0,
                    tcols: vec![0],
                    kind: FkKind::Author,
                });
            }
            tables.push(t);
        }
        let refs: Vec<usize> = (1..=nref).collect();
        if r.chance(40) {
            let target = refs[r.below(refs.len())];
            tables[0].cols.push(Col {
                name: colname(&mut r),
                ty: "integer",
            });
            let c = tables[0].cols.len() - 1;
            tables[0].fks.push(Fk {
                name: "root ref".into(),
                cols: vec![c],
                target,
                tcols: vec![0],
                kind: FkKind::Ref,
            });
        }
        // Owned and link tables, each owned (through its owner key) by an earlier table.
        let nown = r.range(2, 6);
        let mut made_owned = 0;
        while made_owned < nown {
            let idx = tables.len();
            let link = made_owned > 0 && r.chance(20);
            let composite = r.chance(30);
            let mut t = Tbl {
                name: tname(&mut r, idx),
                kind: if link { Kind::Link } else { Kind::Owned },
                cols: vec![],
                pk: vec![],
                rid: 0,
                fks: vec![],
                via: None,
                excluded: BTreeSet::new(),
                rows: vec![],
            };
            if composite {
                t.cols.push(Col {
                    name: colname(&mut r),
                    ty: "integer",
                });
                t.cols.push(Col {
                    name: colname(&mut r),
                    ty: "integer",
                });
                t.pk = vec![0, 1];
            } else {
                t.cols.push(Col {
                    name: "id".into(),
                    ty: "integer",
                });
                t.pk = vec![0];
            }
            t.cols.push(Col {
                name: "rid".into(),
                ty: "integer",
            });
            t.rid = t.cols.len() - 1;
            t.cols.push(Col {
                name: colname(&mut r),
                ty: "text",
            });
            // Owner: the root or an earlier owned (or, for owned tables, link) table.
            let candidates: Vec<usize> = (0..idx)
                .filter(|&i| match tables[i].kind {
                    Kind::Root | Kind::Owned => true,
                    Kind::Link => !link,
                    Kind::Ref { .. } => false,
                })
                .collect();
            let owner = candidates[r.below(candidates.len())];
            let add_key = |t: &mut Tbl,
                           r: &mut Rng,
                           target: usize,
                           kind: FkKind,
                           name: String,
                           tables: &Vec<Tbl>,
                           colname: &mut dyn FnMut(&mut Rng) -> String| {
                let tgt = if target == idx { &*t } else { &tables[target] };
                let tys: Vec<&'static str> = tgt.pk.iter().map(|c| tgt.cols[*c].ty).collect();
                let tcols = tgt.pk.clone();
                let mut cols = vec![];
                for ty in tys {
                    t.cols.push(Col {
                        name: colname(r),
                        ty,
                    });
                    cols.push(t.cols.len() - 1);
                }
                t.fks.push(Fk {
                    name,
                    cols,
                    target,
                    tcols,
                    kind,
                });
            };
            add_key(
                &mut t,
                &mut r,
                owner,
                FkKind::Owner,
                format!("owner {idx}"),
                &tables,
                &mut colname,
            );
            if !link {
                for k in 0..r.below(3) {
                    let cands: Vec<usize> = (0..idx)
                        .filter(|&i| matches!(tables[i].kind, Kind::Root | Kind::Owned))
                        .collect();
                    let target = cands[r.below(cands.len())];
                    add_key(
                        &mut t,
                        &mut r,
                        target,
                        FkKind::Cross,
                        format!("cross {idx}.{k}"),
                        &tables,
                        &mut colname,
                    );
                }
                for k in 0..r.below(3) {
                    let target = refs[r.below(refs.len())];
                    add_key(
                        &mut t,
                        &mut r,
                        target,
                        FkKind::Ref,
                        format!("ref {idx}.{k}"),
                        &tables,
                        &mut colname,
                    );
                }
                if r.chance(25) {
                    add_key(
                        &mut t,
                        &mut r,
                        idx,
                        FkKind::SelfRef,
                        format!("self {idx}"),
                        &tables,
                        &mut colname,
                    );
                }
                let owner_fk = t.owner().unwrap();
                let needs_via = t.fks.iter().any(|f| f.kind == FkKind::Cross);
                if needs_via || r.chance(30) {
                    t.via = Some(if owner_fk.cols.len() == 1 && r.chance(70) {
                        t.cols[owner_fk.cols[0]].name.clone()
                    } else {
                        owner_fk.name.clone()
                    });
                }
                made_owned += 1;
            }
            tables.push(t);
        }
        // Exclusions: any column but the primary key and rid.
        for t in tables.iter_mut() {
            if t.kind != Kind::Link && r.chance(30) {
                let eligible: Vec<usize> = (0..t.cols.len())
                    .filter(|c| !t.pk.contains(c) && *c != t.rid)
                    .collect();
                if !eligible.is_empty() {
                    t.excluded.insert(eligible[r.below(eligible.len())]);
                }
            }
        }

        // Data. Root: families (a parent row and its children) and a few admins.
        let mut rid = 0i64;
        let mut next_rid = || {
            rid += 1;
            V::Int(rid)
        };
        let mut n = 0i64;
        let mut parents = vec![];
        let families = r.range(2, 5);
        for _ in 0..families + r.range(1, 2) {
            n += 1;
            let fam = key_value(key_ty, n);
            parents.push(fam.clone());
            let row = vec![
                fam.clone(),
                V::Null,
                next_rid(),
                V::Text(format!("root {n}")),
            ];
            tables[0].rows.push(row);
            for _ in 0..r.below(4) {
                n += 1;
                let row = vec![
                    key_value(key_ty, n),
                    fam.clone(),
                    next_rid(),
                    V::Text(format!("child {n}")),
                ];
                tables[0].rows.push(row);
            }
        }
        // Children's ids are parent ids too (the predicate decides what they select).
        for row in &tables[0].rows {
            if !parents.contains(&row[0]) {
                parents.push(row[0].clone());
            }
        }
        parents.push(key_value(key_ty, 9999));
        for i in 1..=nref {
            for k in 0..r.range(3, 8) {
                let row = vec![
                    V::Int(k as i64 + 1),
                    next_rid(),
                    V::Text(format!("ref {i}.{k}")),
                ];
                tables[i].rows.push(row);
            }
        }
        for i in nref + 1..tables.len() {
            for k in 0..r.range(1, 12) {
                let mut row = vec![];
                if tables[i].pk.len() == 2 {
                    row.push(V::Int(k as i64 + 1));
                    row.push(V::Int(r.range(1, 3) as i64));
                } else {
                    row.push(V::Int(k as i64 + 1));
                }
                row.push(next_rid());
                row.push(V::Text(format!("row {i}.{k}")));
                tables[i].rows.push(row);
            }
        }
        // Key values: a random row of the target (an earlier row for self-references), or NULL.
        for i in 0..tables.len() {
            let nrows = tables[i].rows.len();
            for k in 0..nrows {
                let ncols = tables[i].cols.len();
                while tables[i].rows[k].len() < ncols {
                    tables[i].rows[k].push(V::Null);
                }
                for f in 0..tables[i].fks.len() {
                    let (target, kind, cols, tcols) = {
                        let fk = &tables[i].fks[f];
                        (fk.target, fk.kind, fk.cols.clone(), fk.tcols.clone())
                    };
                    if kind == FkKind::RootParent {
                        continue; // set with the rows above
                    }
                    let pool = if target == i {
                        k
                    } else {
                        tables[target].rows.len()
                    };
                    let null_pct = match kind {
                        FkKind::Owner => 15,
                        _ => 30,
                    };
                    if pool == 0 || r.chance(null_pct) {
                        continue;
                    }
                    let pick = r.below(pool);
                    let vals: Vec<V> = tcols
                        .iter()
                        .map(|c| tables[target].rows[pick][*c].clone())
                        .collect();
                    for (c, v) in cols.iter().zip(vals) {
                        tables[i].rows[k][*c] = v;
                    }
                }
            }
        }
        Dataset {
            seed,
            schema,
            key_ty,
            pred_with_parent: r.chance(75),
            tables,
            parents,
        }
    }

    fn rel(&self, t: usize) -> String {
        format!("{}.{}", qi(&self.schema), qi(&self.tables[t].name))
    }

    fn ddl(&self) -> String {
        let mut s = format!("CREATE SCHEMA {};\n", qi(&self.schema));
        for (i, t) in self.tables.iter().enumerate() {
            let cols: Vec<String> = t
                .cols
                .iter()
                .map(|c| format!("{} {}", qi(&c.name), c.ty))
                .collect();
            let pk: Vec<String> = t.pk.iter().map(|c| qi(&t.cols[*c].name)).collect();
            s.push_str(&format!(
                "CREATE TABLE {} ({}, PRIMARY KEY ({}));\n",
                self.rel(i),
                cols.join(", "),
                pk.join(", ")
            ));
            for row in &t.rows {
                let vals: Vec<String> = row.iter().map(V::sql).collect();
                s.push_str(&format!(
                    "INSERT INTO {} VALUES ({});\n",
                    self.rel(i),
                    vals.join(", ")
                ));
            }
        }
        for (i, t) in self.tables.iter().enumerate() {
            for fk in &t.fks {
                let c: Vec<String> = fk.cols.iter().map(|c| qi(&t.cols[*c].name)).collect();
                let tc: Vec<String> = fk
                    .tcols
                    .iter()
                    .map(|c| qi(&self.tables[fk.target].cols[*c].name))
                    .collect();
                s.push_str(&format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({});\n",
                    self.rel(i),
                    qi(&fk.name),
                    c.join(", "),
                    self.rel(fk.target),
                    tc.join(", ")
                ));
            }
        }
        s
    }

    /// The declarations, in an order a DBA would use: root, reference tables, then owned
    /// tables from the root outwards; exclusions before or after, at random.
    fn declarations(&self, r: &mut Rng) -> Vec<String> {
        let mut out = vec![];
        let pred = if self.pred_with_parent {
            "id = $1 OR \"Parent Id\" = $1"
        } else {
            "id = $1"
        };
        let mut excl = vec![];
        for (i, t) in self.tables.iter().enumerate() {
            for c in &t.excluded {
                excl.push(format!(
                    "SELECT poco_scope_exclude_column({}, {})",
                    lit(&self.rel(i)),
                    lit(&t.cols[*c].name)
                ));
            }
        }
        let early = r.chance(50);
        if early {
            out.append(&mut excl.clone());
        }
        out.push(format!(
            "SELECT poco_scope_root({}, {})",
            lit(&self.rel(0)),
            lit(pred)
        ));
        let mut refs: Vec<usize> = (0..self.tables.len())
            .filter(|&i| matches!(self.tables[i].kind, Kind::Ref { .. }))
            .collect();
        for k in (1..refs.len()).rev() {
            refs.swap(k, r.below(k + 1));
        }
        for i in refs {
            let Kind::Ref { all } = self.tables[i].kind else {
                unreachable!()
            };
            out.push(if all || r.chance(50) {
                format!(
                    "SELECT poco_scope_reference({}, {})",
                    lit(&self.rel(i)),
                    lit(if all { "all" } else { "referenced" })
                )
            } else {
                format!("SELECT poco_scope_reference({})", lit(&self.rel(i)))
            });
        }
        for (i, t) in self.tables.iter().enumerate() {
            if t.kind == Kind::Owned {
                out.push(match &t.via {
                    Some(v) => format!(
                        "SELECT poco_scope_table({}, via => {})",
                        lit(&self.rel(i)),
                        lit(v)
                    ),
                    None => format!("SELECT poco_scope_table({})", lit(&self.rel(i))),
                });
            }
        }
        if !early {
            out.append(&mut excl);
        }
        out
    }

    /// The oracle: which rows of each table are in `parent`'s scope, by walking the rows.
    fn oracle(&self, parent: &V) -> Vec<Vec<bool>> {
        let mut m: Vec<Vec<bool>> = self
            .tables
            .iter()
            .map(|t| vec![false; t.rows.len()])
            .collect();
        for (k, row) in self.tables[0].rows.iter().enumerate() {
            m[0][k] = &row[0] == parent || (self.pred_with_parent && &row[1] == parent);
        }
        // Owned and link tables in creation order (owners come first).
        for i in 1..self.tables.len() {
            let t = &self.tables[i];
            let Some(fk) = t.owner() else { continue };
            for k in 0..t.rows.len() {
                let vals: Vec<&V> = fk.cols.iter().map(|c| &t.rows[k][*c]).collect();
                if vals.iter().any(|v| **v == V::Null) {
                    continue;
                }
                let target = &self.tables[fk.target];
                m[i][k] = (0..target.rows.len()).any(|q| {
                    m[fk.target][q]
                        && fk
                            .tcols
                            .iter()
                            .zip(&vals)
                            .all(|(tc, v)| &target.rows[q][*tc] == *v)
                });
            }
        }
        // Reference tables: everything for 'all'; for 'referenced', what scoped rows point at,
        // through keys whose columns are not excluded, until nothing changes.
        for (i, t) in self.tables.iter().enumerate() {
            if let Kind::Ref { all: true } = t.kind {
                m[i] = vec![true; t.rows.len()];
            }
        }
        loop {
            let mut changed = false;
            for (i, t) in self.tables.iter().enumerate() {
                if !t.scoped() {
                    continue;
                }
                for fk in &t.fks {
                    if !matches!(self.tables[fk.target].kind, Kind::Ref { all: false }) {
                        continue;
                    }
                    if fk.cols.iter().any(|c| t.excluded.contains(c)) {
                        continue;
                    }
                    for k in 0..t.rows.len() {
                        if !m[i][k] {
                            continue;
                        }
                        let vals: Vec<&V> = fk.cols.iter().map(|c| &t.rows[k][*c]).collect();
                        if vals.iter().any(|v| **v == V::Null) {
                            continue;
                        }
                        let target = &self.tables[fk.target];
                        for q in 0..target.rows.len() {
                            if !m[fk.target][q]
                                && fk
                                    .tcols
                                    .iter()
                                    .zip(&vals)
                                    .all(|(tc, v)| &target.rows[q][*tc] == *v)
                            {
                                m[fk.target][q] = true;
                                changed = true;
                            }
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        m
    }
}

#[derive(Default)]
struct Tally {
    datasets: usize,
    tables: usize,
    checks: usize,
    rows_compared: usize,
    owner_checks: usize,
    leaked: usize,
    missing: usize,
    failures: Vec<String>,
}

fn run_dataset(db: &Db, ds: &Dataset, tally: &mut Tally) {
    let mut r = Rng(ds.seed ^ 0xD1B5_4A32_D192_ED03);
    db.execute(&ds.ddl());
    for stmt in ds.declarations(&mut r) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| db.execute(&stmt)))
        {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("seed {}: declaration failed: {msg}", ds.seed);
        }
    }
    let scoped: Vec<usize> = (0..ds.tables.len())
        .filter(|&i| ds.tables[i].scoped())
        .collect();
    let mut sql_of = BTreeMap::new();
    let mut oid_of = BTreeMap::new();
    for &i in &scoped {
        let row = &db.query(&format!(
            "SELECT select_sql, {}::regclass::oid::int8 FROM poco.scope_tables WHERE table_name::regclass = {}::regclass",
            lit(&ds.rel(i)),
            lit(&ds.rel(i))
        ));
        assert_eq!(
            row.len(),
            1,
            "seed {}: {} missing from poco.scope_tables",
            ds.seed,
            ds.rel(i)
        );
        sql_of.insert(i, row[0].get::<_, String>(0));
        oid_of.insert(row[0].get::<_, i64>(1), i);
    }
    let n_scoped: i64 = db.query("SELECT count(*) FROM poco.scope_tables")[0].get(0);
    assert_eq!(
        n_scoped as usize,
        scoped.len(),
        "seed {}: link tables must not be scoped",
        ds.seed
    );
    tally.tables += scoped.len();
    let parent_texts: Vec<String> = ds.parents.iter().map(V::text).collect();
    let mut oracles = vec![];
    for parent in &ds.parents {
        let m = ds.oracle(parent);
        let p = parent.text();
        // Compiled queries against the oracle, row by row (rid identifies a row).
        for &i in &scoped {
            let t = &ds.tables[i];
            let q = format!(
                "SELECT q.{}::int4 FROM ({}) q",
                qi(&t.cols[t.rid].name),
                sql_of[&i]
            );
            let got: BTreeSet<i32> = db
                .query_with(&q, &[&p])
                .iter()
                .map(|r| r.get::<_, i32>(0))
                .collect();
            let want: BTreeSet<i32> = t
                .rows
                .iter()
                .zip(&m[i])
                .filter(|(_, inn)| **inn)
                .map(|(row, _)| match row[t.rid] {
                    V::Int(n) => n as i32,
                    _ => unreachable!(),
                })
                .collect();
            tally.checks += 1;
            tally.rows_compared += t.rows.len();
            let leaked: Vec<_> = got.difference(&want).collect();
            let missing: Vec<_> = want.difference(&got).collect();
            tally.leaked += leaked.len();
            tally.missing += missing.len();
            if !leaked.is_empty() || !missing.is_empty() {
                tally.failures.push(format!(
                    "seed {} table {} parent {p}: leaked rids {leaked:?}, missing rids {missing:?}",
                    ds.seed,
                    ds.rel(i)
                ));
            }
        }
        // The preview's counts are those of the compiled queries, i.e. the oracle's.
        for row in db.query_with(
            "SELECT table_name::regclass::oid::int8, rows FROM poco_scope_preview($1::text)",
            &[&p],
        ) {
            let i = oid_of[&row.get::<_, i64>(0)];
            let want = m[i].iter().filter(|x| **x).count() as i64;
            let got: i64 = row.get(1);
            if got != want {
                tally.failures.push(format!(
                    "seed {} preview {} parent {p}: {got} rows, oracle {want}",
                    ds.seed,
                    ds.rel(i)
                ));
            }
        }
        oracles.push(m);
    }
    // The reverse direction: the owners of a row are exactly the parents whose scope holds it.
    for &i in &scoped {
        let t = &ds.tables[i];
        for _ in 0..2.min(t.rows.len()) {
            let k = r.below(t.rows.len());
            let V::Int(rid) = t.rows[k][t.rid] else {
                unreachable!()
            };
            let q = format!(
                "SELECT coalesce(array_agg(o ORDER BY o), '{{}}') FROM poco_scope_owners({}, \
                   (SELECT to_jsonb(x) FROM {} x WHERE {} = {rid}), $1::text[]) o",
                lit(&ds.rel(i)),
                ds.rel(i),
                qi(&t.cols[t.rid].name)
            );
            let got: Vec<String> = db.query_with(&q, &[&parent_texts])[0].get(0);
            let mut want: Vec<String> = ds
                .parents
                .iter()
                .zip(&oracles)
                .filter(|(_, m)| m[i][k])
                .map(|(p, _)| p.text())
                .collect();
            want.sort();
            tally.owner_checks += 1;
            if got != want {
                tally.failures.push(format!(
                    "seed {} owners of {} rid {rid}: {got:?}, oracle {want:?}",
                    ds.seed,
                    ds.rel(i)
                ));
            }
        }
    }
    db.execute(&format!(
        "SELECT poco_scope_clear(); DROP SCHEMA {} CASCADE;",
        qi(&ds.schema)
    ));
    tally.datasets += 1;
}

#[test]
fn compiled_scope_matches_the_oracle_on_random_datasets() {
    let n: u64 = std::env::var("POCO_ISOLATION_DATASETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let first: u64 = std::env::var("POCO_ISOLATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let platform = Server::start("isolation", &Options::platform());
    let db = platform.connect("platform");
    let mut tally = Tally::default();
    let mut shapes = BTreeMap::new();
    for seed in first..first + n {
        let ds = Dataset::generate(seed);
        *shapes.entry(ds.key_ty).or_insert(0) += 1;
        for t in &ds.tables {
            let key = match t.kind {
                Kind::Link => "link tables",
                Kind::Ref { all: true } => "reference (all)",
                Kind::Ref { all: false } => "reference (referenced)",
                _ if t.pk.len() > 1 => "composite keys",
                _ => "other tables",
            };
            *shapes.entry(key).or_insert(0) += 1;
            if t.via.is_some() {
                *shapes.entry("via").or_insert(0) += 1;
            }
            if t.fks.iter().any(|f| f.kind == FkKind::SelfRef) {
                *shapes.entry("self-references").or_insert(0) += 1;
            }
            if t.fks.iter().any(|f| f.kind == FkKind::Cross) {
                *shapes.entry("cross-family keys").or_insert(0) += 1;
            }
            *shapes.entry("excluded columns").or_insert(0) += t.excluded.len();
        }
        run_dataset(&db, &ds, &mut tally);
    }
    eprintln!(
        "isolation: {} datasets, {} scoped tables, {} (table, parent) checks over {} rows, {} owner checks: {} leaked, {} missing",
        tally.datasets, tally.tables, tally.checks, tally.rows_compared, tally.owner_checks, tally.leaked, tally.missing
    );
    eprintln!("shapes: {shapes:?}");
    assert!(
        tally.failures.is_empty(),
        "{} mismatches, first ones:\n{}",
        tally.failures.len(),
        tally
            .failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!((tally.leaked, tally.missing), (0, 0));
    assert!(tally.datasets as u64 == n && n >= 1);
    // The generator really produced every shape it claims to.
    for shape in [
        "link tables",
        "reference (all)",
        "reference (referenced)",
        "composite keys",
        "via",
        "self-references",
        "cross-family keys",
        "excluded columns",
        "uuid",
        "text",
        "integer",
        "bigint",
    ] {
        if n >= 50 {
            assert!(
                shapes.get(shape).copied().unwrap_or(0) > 0,
                "no dataset had {shape}"
            );
        }
    }
}
