//! Account scope: from the DBA's declarations (a root, owned tables, reference tables, excluded
//! columns) and a snapshot of the platform's foreign keys, decide exactly which rows belong to
//! one parent and compile that into SQL.
//!
//! Rules (API.md §1, README "Account scope"):
//! - **Root**: rows of the root table for which the predicate holds, `$1` being the parent id.
//! - **Owned** table T: a row is in scope when its ownership path leads to an in-scope root row.
//!   The path is a chain of foreign keys T → … → root. It may pass through other owned tables and
//!   through undeclared tables (used for the join only, never sent), never through a reference
//!   table. Candidates are enumerated from the FK graph; `via` (a constraint or column name)
//!   filters them by their first hop. A path whose first hop lands directly on an owned table or
//!   the root beats longer ones; otherwise exactly one candidate must remain.
//! - **Reference** table R: `all` sends every row; `referenced` sends the rows that in-scope rows
//!   of any scoped table reference through a foreign key, transitively (a lesson referenced by
//!   progress pulls its course). A self-reference (a lesson's prerequisite) is followed
//!   recursively. A cycle through several `referenced` tables is refused.
//! - A NULL in any column of a foreign key means "no reference" (MATCH SIMPLE), so such a row
//!   reaches nothing through that key.
//!
//! Everything here is pure: the extension loads `Catalog` and `Declarations` through SPI and
//! runs the SQL this module writes. Identifiers arrive already quoted by PostgreSQL's
//! `quote_ident`; values never appear in the SQL, only `$1` (the parent id as text, cast to the
//! root key's type) and, for the owners query, `$2`.

use crate::error::{PocoError, Result, SqlState};
use crate::predicate::Predicate;
use std::collections::{BTreeMap, BTreeSet};

pub type Oid = u32;

/// The root table's alias wherever its predicate is evaluated, in every compiled query: the
/// predicate may name the root's columns plainly or as `poco_root.column`, and is checked
/// alone against `FROM root poco_root` when declared (src/scope.rs), so any other qualifier
/// (the compiled queries' own aliases, which would bind to another table) is refused there.
pub const ROOT_ALIAS: &str = "poco_root";

/// Longest ownership path searched, in foreign keys.
pub const MAX_PATH_LEN: usize = 12;
/// At most this many candidate paths are collected (and listed in an error).
const MAX_CANDIDATES: usize = 16;
/// Bound on the path search's work, whatever the shape of the schema.
const MAX_SEARCH_STEPS: usize = 200_000;

#[derive(Debug, Clone, Default)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    /// The name as PostgreSQL's quote_ident writes it.
    pub ident: String,
    /// format_type() of the column's type.
    pub type_sql: String,
    /// The type is built in all the way down (through domains): to_jsonb needs no cast.
    pub plain: bool,
    /// The type to read a value of this column as without running anyone's code (domains as
    /// their base type, see poco.type_profile); format_type() form.
    pub safe_type: String,
    /// Its base type is json or jsonb.
    pub json: bool,
    /// A generated column: what its expression reads.
    pub generated: Option<Generated>,
}

/// What a generated column's expression depends on (pg_depend of its pg_attrdef).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    /// Columns of the same table it reads.
    pub reads: Vec<i16>,
    /// It calls a function outside pg_catalog (which may read anything, an excluded column
    /// of any table among it, whatever it is declared to be).
    pub calls_user_function: bool,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub oid: Oid,
    /// schema.table, each part quoted as needed.
    pub ident: String,
    /// pg_class.relkind: 'r' table, 'p' partitioned table (others cannot be scoped).
    pub relkind: char,
    /// Live columns in attnum order.
    pub columns: Vec<Column>,
    pub pk: Option<Vec<i16>>,
    /// Key columns of each valid index, in index order.
    pub indexes: Vec<Vec<i16>>,
}

impl Table {
    pub fn column(&self, attnum: i16) -> Option<&Column> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }
    pub fn column_named(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
    fn idents(&self, cols: &[i16]) -> Vec<String> {
        cols.iter()
            .map(|a| {
                self.column(*a)
                    .map(|c| c.ident.clone())
                    .unwrap_or_else(|| format!("#{a}"))
            })
            .collect()
    }
    fn from_item(&self) -> String {
        if self.relkind == 'p' {
            self.ident.clone()
        } else {
            format!("ONLY {}", self.ident)
        }
    }
}

#[derive(Debug, Clone)]
pub struct ForeignKey {
    /// Constraint name (unquoted, as in pg_constraint).
    pub name: String,
    pub child: Oid,
    pub child_cols: Vec<i16>,
    pub parent: Oid,
    pub parent_cols: Vec<i16>,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub tables: BTreeMap<Oid, Table>,
    pub fks: Vec<ForeignKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefMode {
    Referenced,
    All,
}

impl RefMode {
    pub fn parse(s: &str) -> Result<RefMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "referenced" => Ok(RefMode::Referenced),
            "all" => Ok(RefMode::All),
            _ => Err(scope_err(
                SqlState::InvalidParameterValue,
                format!("invalid reference mode \"{s}\""),
                "Use 'referenced' (only the rows in-scope rows point at) or 'all' (the whole table).",
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RefMode::Referenced => "referenced",
            RefMode::All => "all",
        }
    }
}

/// What the DBA declared (poco.scope and poco.scope_exclusion).
#[derive(Debug, Clone, Default)]
pub struct Declarations {
    pub root: Option<(Oid, String)>,
    pub owned: Vec<(Oid, Option<String>)>,
    pub reference: Vec<(Oid, RefMode)>,
    pub excluded: Vec<Exclusion>,
}

/// A column that never leaves the platform, as declared: the column's number (which follows
/// it through renames) and the name it had (which a dump and restore keeps). Both are
/// excluded when they no longer name the same column, so a rename, a dropped and re-added
/// column, or renumbered columns after a restore never send what was excluded.
#[derive(Debug, Clone, PartialEq)]
pub struct Exclusion {
    pub rel: Oid,
    pub attnum: Option<i16>,
    pub name: String,
}

impl Exclusion {
    pub fn named(rel: Oid, name: &str) -> Exclusion {
        Exclusion {
            rel,
            attnum: None,
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Root,
    Owned,
    Reference(RefMode),
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Owned => "owned",
            Role::Reference(_) => "reference",
        }
    }
}

/// One foreign key of a scoped table and whether the learner gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FkVerdict {
    pub name: String,
    /// `name: child(cols) → parent(cols)`
    pub text: String,
    pub sent: bool,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct ScopedTable {
    pub oid: Oid,
    pub ident: String,
    pub role: Role,
    /// How rows are chosen, for people: the ownership path, the predicate, or the references.
    pub path: String,
    /// Owned tables: the foreign keys (indexes into `Catalog::fks`) from this table to the root.
    pub chain: Vec<usize>,
    /// Quoted names of the columns that leave the platform, in attnum order.
    pub columns: Vec<String>,
    /// Every live column in attnum order (what a row image holds).
    pub all_columns: Vec<Column>,
    /// Quoted names of the columns that stay, declared or derived (a generated column that
    /// reads one), and their numbers.
    pub excluded: Vec<String>,
    pub excluded_attnums: Vec<i16>,
    pub fks: Vec<FkVerdict>,
    pub warnings: Vec<String>,
    /// `$1` = parent id (text). Returns the sent columns of the parent's rows.
    pub select_sql: String,
    /// `$1` = parent id (text). Counts the parent's rows.
    pub count_sql: String,
    /// `$1` = candidate parent ids (text[]), `$2` = a row of this table as jsonb. Returns the
    /// candidates whose scope holds such a row (given the current contents of the other tables),
    /// and for an owned table also one NULL when the row's path reaches no root row at all (an
    /// ancestor is gone: whom it belonged to is not known from the tables any more).
    pub owners_sql: String,
    /// Owned tables: the first foreign key of the ownership path.
    pub up: Option<Hop>,
}

/// One foreign key of an ownership path, by column names (unquoted, in key order).
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    pub parent: Oid,
    pub child_cols: Vec<String>,
    pub parent_cols: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Scope {
    pub root: Oid,
    pub key_column: String,
    /// The parent id's type: the root key's type with domains resolved to their base (a
    /// parent id is cast to it, and a domain's CHECK could run its owner's code).
    pub key_type: String,
    /// The root predicate as declared.
    pub predicate: String,
    pub tables: Vec<ScopedTable>,
    /// Undeclared tables that ownership paths pass through: never sent, but a change of one
    /// can move rows between families, so continuous sync captures them too.
    pub paths: Vec<PathTable>,
}

/// An undeclared table on an ownership path (see `Scope::paths`).
#[derive(Debug, Clone)]
pub struct PathTable {
    pub oid: Oid,
    pub ident: String,
    /// Every live column in attnum order (what a row image holds).
    pub all_columns: Vec<Column>,
    /// Primary key column names, if it has one (its rows are found in the log by it).
    pub pk: Vec<String>,
    /// One owners query (like `ScopedTable::owners_sql`) per distinct way up from here to the
    /// root (nearly always one): a row belongs to the union.
    pub owners_sql: Vec<String>,
    /// The first foreign key of the (first) way up.
    pub up: Option<Hop>,
}

impl Scope {
    pub fn table(&self, oid: Oid) -> Option<&ScopedTable> {
        self.tables.iter().find(|t| t.oid == oid)
    }
    pub fn path_table(&self, oid: Oid) -> Option<&PathTable> {
        self.paths.iter().find(|t| t.oid == oid)
    }
    /// Every table whose changes continuous sync captures: the scoped ones and the path ones.
    pub fn captured(&self) -> Vec<Oid> {
        self.tables
            .iter()
            .map(|t| t.oid)
            .chain(self.paths.iter().map(|p| p.oid))
            .collect()
    }
}

/// SQL that turns the text parameter `$1` into the root key's type and back to its canonical
/// text (and fails on bad input).
pub fn canonical_parent_sql(key_type: &str) -> String {
    format!("SELECT (($1::pg_catalog.text)::{key_type})::pg_catalog.text")
}

pub fn scope_err(
    state: SqlState,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> PocoError {
    PocoError::Scope {
        state,
        message: message.into(),
        hint: hint.into(),
    }
}

struct Ctx<'a> {
    cat: &'a Catalog,
    decls: &'a Declarations,
    roles: BTreeMap<Oid, Role>,
    root: Option<Oid>,
    by_child: BTreeMap<Oid, Vec<usize>>,
    /// The columns that never leave, by table: declared and derived.
    excluded: BTreeMap<Oid, BTreeSet<i16>>,
    /// Why columns were excluded beyond what was declared, or what an exclusion no longer
    /// matches, by table: shown in the preview's warnings.
    exclusion_notes: BTreeMap<Oid, Vec<String>>,
}

impl<'a> Ctx<'a> {
    fn table(&self, oid: Oid) -> Result<&'a Table> {
        self.cat.tables.get(&oid).ok_or_else(|| {
            scope_err(
                SqlState::UndefinedTable,
                format!("a scoped table (OID {oid}) no longer exists"),
                format!("Remove its declaration: SELECT poco_scope_remove({oid});"),
            )
        })
    }
    fn name(&self, oid: Oid) -> String {
        self.cat
            .tables
            .get(&oid)
            .map(|t| t.ident.clone())
            .unwrap_or_else(|| format!("OID {oid}"))
    }
    fn is_excluded(&self, oid: Oid, attnum: i16) -> bool {
        self.excluded.get(&oid).is_some_and(|s| s.contains(&attnum))
    }
    fn fk_cols_text(&self, oid: Oid, cols: &[i16]) -> String {
        match self.cat.tables.get(&oid) {
            Some(t) => format!("{}({})", t.ident, t.idents(cols).join(", ")),
            None => format!("OID {oid}"),
        }
    }
    fn describe_chain(&self, chain: &[usize]) -> String {
        let mut s = String::new();
        for &i in chain {
            let fk = &self.cat.fks[i];
            s.push_str(&self.fk_cols_text(fk.child, &fk.child_cols));
            s.push_str(" → ");
        }
        if let Some(&last) = chain.last() {
            s.push_str(&self.name(self.cat.fks[last].parent));
        }
        s
    }

    /// Every simple FK path from `t` that ends at the root or an owned table, through
    /// undeclared tables only.
    fn segments(&self, t: Oid) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        let mut visited = BTreeSet::from([t]);
        let mut path = Vec::new();
        let mut steps = 0usize;
        self.dfs(t, &mut visited, &mut path, &mut out, &mut steps);
        out
    }

    fn dfs(
        &self,
        node: Oid,
        visited: &mut BTreeSet<Oid>,
        path: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
        steps: &mut usize,
    ) {
        let Some(edges) = self.by_child.get(&node) else {
            return;
        };
        for &i in edges {
            *steps += 1;
            if out.len() >= MAX_CANDIDATES || *steps > MAX_SEARCH_STEPS {
                return;
            }
            let p = self.cat.fks[i].parent;
            if visited.contains(&p) {
                continue;
            }
            path.push(i);
            match self.roles.get(&p) {
                Some(Role::Root) | Some(Role::Owned) => out.push(path.clone()),
                Some(Role::Reference(_)) => {}
                None => {
                    if path.len() < MAX_PATH_LEN && self.cat.tables.contains_key(&p) {
                        visited.insert(p);
                        self.dfs(p, visited, path, out, steps);
                        visited.remove(&p);
                    }
                }
            }
            path.pop();
        }
    }

    fn fk_matches_via(&self, fk: &ForeignKey, via: &str) -> bool {
        if fk.name == via {
            return true;
        }
        let t = &self.cat.tables[&fk.child];
        fk.child_cols
            .iter()
            .any(|a| t.column(*a).is_some_and(|c| c.name == via))
    }

    /// What to pass as via for this FK: its column when it has one, else the constraint.
    fn via_name(&self, fk: &ForeignKey) -> String {
        match fk.child_cols.as_slice() {
            [a] => self.cat.tables[&fk.child]
                .column(*a)
                .map(|c| c.name.clone())
                .unwrap_or_else(|| fk.name.clone()),
            _ => fk.name.clone(),
        }
    }

    /// The first hop and stop of `t`'s ownership path.
    fn choose_segment(&self, t: Oid, via: Option<&str>, root: Oid) -> Result<Vec<usize>> {
        let tname = self.name(t);
        let all = self.segments(t);
        let list = |segs: &[Vec<usize>]| -> String {
            segs.iter()
                .map(|s| self.describe_chain(s))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let segs: Vec<Vec<usize>> = match via {
            None => all.clone(),
            Some(v) => {
                let own_fks: Vec<&ForeignKey> = self
                    .by_child
                    .get(&t)
                    .into_iter()
                    .flatten()
                    .map(|&i| &self.cat.fks[i])
                    .collect();
                if !own_fks.iter().any(|fk| self.fk_matches_via(fk, v)) {
                    let names: Vec<String> = own_fks
                        .iter()
                        .map(|fk| {
                            format!(
                                "{} ({})",
                                fk.name,
                                self.fk_cols_text(fk.child, &fk.child_cols)
                            )
                        })
                        .collect();
                    return Err(scope_err(
                        SqlState::UndefinedColumn,
                        format!("{tname} has no foreign key or foreign-key column named \"{v}\""),
                        if names.is_empty() {
                            format!("{tname} has no foreign keys at all.")
                        } else {
                            format!("via names a foreign key constraint or one of its columns. Foreign keys of {tname}: {}", names.join(", "))
                        },
                    ));
                }
                let f: Vec<Vec<usize>> = all
                    .iter()
                    .filter(|s| self.fk_matches_via(&self.cat.fks[s[0]], v))
                    .cloned()
                    .collect();
                if f.is_empty() {
                    return Err(scope_err(
                        SqlState::InvalidForeignKey,
                        format!(
                            "foreign key \"{v}\" of {tname} does not lead to the account root {}",
                            self.name(root)
                        ),
                        if all.is_empty() {
                            format!("{tname} has no foreign key path to the root at all.")
                        } else {
                            format!("Paths that do lead there: {}", list(&all))
                        },
                    ));
                }
                f
            }
        };
        // One path whose first key lands on an owned table or the root wins; failing that,
        // the only path there is.
        let direct: Vec<&Vec<usize>> = segs.iter().filter(|s| s.len() == 1).collect();
        if direct.len() == 1 {
            return Ok(direct[0].clone());
        }
        if direct.is_empty() && segs.len() == 1 {
            return Ok(segs[0].clone());
        }
        if segs.is_empty() {
            return Err(scope_err(
                SqlState::InvalidForeignKey,
                format!("no foreign key path leads from {tname} to the account root {}", self.name(root)),
                format!(
                    "An owned table reaches the root through foreign keys, possibly through other owned tables. Add a foreign key, or declare {tname} with poco_scope_reference() if it holds shared content."
                ),
            ));
        }
        let cands: Vec<Vec<usize>> = if direct.len() > 1 {
            direct.into_iter().cloned().collect()
        } else {
            segs.clone()
        };
        Err(scope_err(
            SqlState::AmbiguousColumn,
            format!("several foreign key paths lead from {tname} to the account root: {}", list(&cands)),
            format!(
                "Pick one with via, a constraint or column name: SELECT poco_scope_table('{}', via => '{}');",
                tname.replace('\'', "''"),
                self.via_name(&self.cat.fks[cands[0][0]]).replace('\'', "''")
            ),
        ))
    }
}

/// Resolve and compile the declarations against the catalog. `Ok(None)` when there is no root
/// and nothing that needs one (reference tables and exclusions are still checked).
pub fn compile(cat: &Catalog, decls: &Declarations) -> Result<Option<Scope>> {
    let mut roles = BTreeMap::new();
    if let Some((r, _)) = &decls.root {
        roles.insert(*r, Role::Root);
    }
    for (t, _) in &decls.owned {
        roles.insert(*t, Role::Owned);
    }
    for (t, m) in &decls.reference {
        roles.insert(*t, Role::Reference(*m));
    }
    let mut by_child: BTreeMap<Oid, Vec<usize>> = BTreeMap::new();
    for (i, fk) in cat.fks.iter().enumerate() {
        by_child.entry(fk.child).or_default().push(i);
    }
    let (excluded, exclusion_notes) = effective_exclusions(cat, decls)?;
    let cx = Ctx {
        cat,
        decls,
        roles,
        root: decls.root.as_ref().map(|r| r.0),
        by_child,
        excluded,
        exclusion_notes,
    };

    // Every declared table exists and is a table.
    for oid in cx.roles.keys() {
        let t = cx.table(*oid)?;
        if t.relkind != 'r' && t.relkind != 'p' {
            return Err(scope_err(
                SqlState::WrongObjectType,
                format!("{} is not a table", t.ident),
                "Only tables and partitioned tables can be scoped.",
            ));
        }
    }
    // No excluded column (declared or derived) is part of a primary key.
    for (oid, nums) in &cx.excluded {
        let t = cx.table(*oid)?;
        if let Some(c) = nums
            .iter()
            .find(|a| t.pk.as_ref().is_some_and(|pk| pk.contains(a)))
            .and_then(|a| t.column(*a))
        {
            return Err(scope_err(
                SqlState::InvalidParameterValue,
                format!(
                    "column {} of {} is part of its primary key and cannot be excluded",
                    c.ident, t.ident
                ),
                if c.generated.is_some() {
                    "It is a generated column that reads an excluded column (or calls a function outside pg_catalog): the learner needs the key to identify rows. Key the table on other columns, or do not exclude what it reads."
                } else {
                    "The learner needs the key to identify rows. Exclude other columns."
                },
            ));
        }
    }

    let Some((root, pred_text)) = decls.root.clone() else {
        if let Some((t, _)) = decls.owned.first() {
            return Err(scope_err(
                SqlState::ObjectNotInPrerequisiteState,
                format!("{} is declared as owned but no scope root is declared", cx.name(*t)),
                "Declare the account's root first, e.g. SELECT poco_scope_root('users', 'id = $1 OR parent_id = $1');",
            ));
        }
        check_reference_cycles(&cx)?;
        return Ok(None);
    };
    let root_t = cx.table(root)?;
    let key_col = match &root_t.pk {
        Some(pk) if pk.len() == 1 => root_t.column(pk[0]).cloned().expect("pk column"),
        _ => {
            return Err(scope_err(
                SqlState::InvalidTableDefinition,
                format!("the scope root {} has no single-column primary key", root_t.ident),
                "The root's primary key gives the parent id its type (integer, bigint, uuid, text...). Add a one-column primary key to the root table.",
            ))
        }
    };
    let pred = Predicate::parse(&pred_text)?;

    // Ownership: one segment per owned table, composed into a chain to the root.
    let mut seg: BTreeMap<Oid, Vec<usize>> = BTreeMap::new();
    for (t, via) in &decls.owned {
        seg.insert(*t, cx.choose_segment(*t, via.as_deref(), root)?);
    }
    let mut chains: BTreeMap<Oid, Vec<usize>> = BTreeMap::new();
    for (t, _) in &decls.owned {
        let mut chain = Vec::new();
        let mut seen = vec![*t];
        let mut cur = *t;
        loop {
            let s = &seg[&cur];
            chain.extend_from_slice(s);
            let stop = cat.fks[*s.last().unwrap()].parent;
            if stop == root {
                break;
            }
            if seen.contains(&stop) {
                let names: Vec<String> = seen.iter().map(|o| cx.name(*o)).collect();
                return Err(scope_err(
                    SqlState::InvalidObjectDefinition,
                    format!(
                        "the ownership paths of {} lead to each other, never to the account root",
                        names.join(", ")
                    ),
                    "Give one of them a via (column or constraint) whose path ends at the root.",
                ));
            }
            seen.push(stop);
            cur = stop;
        }
        chains.insert(*t, chain);
    }
    check_reference_cycles(&cx)?;
    for (t, m) in &decls.reference {
        if *m == RefMode::Referenced
            && !self_edges(&cx, *t).is_empty()
            && cx.table(*t)?.pk.is_none()
        {
            return Err(scope_err(
                SqlState::InvalidTableDefinition,
                format!("reference table {} refers to itself but has no primary key", cx.name(*t)),
                "Add a primary key (needed to follow the self-reference), or declare it with mode 'all'.",
            ));
        }
    }

    if !key_col.plain {
        return Err(scope_err(
            SqlState::FeatureNotSupported,
            format!(
                "the scope root's key {} has the type {}, which is not built in",
                key_col.ident, key_col.type_sql
            ),
            "A parent id is cast to the root key's type on every query, and a type's owner could run code in that cast. Key the root on a built-in type (integer, bigint, uuid, text...) or a domain over one.",
        ));
    }
    let key_type = key_col.safe_type.clone();
    let g = Gen {
        cx: &cx,
        chains: &chains,
        pred: &pred,
        key_type: &key_type,
    };

    let mut order: Vec<(Oid, Role)> = vec![(root, Role::Root)];
    let mut owned: Vec<Oid> = decls.owned.iter().map(|o| o.0).collect();
    owned.sort_by_key(|o| (chains[o].len(), cx.name(*o)));
    order.extend(owned.into_iter().map(|o| (o, Role::Owned)));
    let mut refs: Vec<(Oid, RefMode)> = decls.reference.clone();
    refs.sort_by_key(|r| cx.name(r.0));
    order.extend(refs.into_iter().map(|(o, m)| (o, Role::Reference(m))));

    let mut tables = Vec::new();
    for (oid, role) in order {
        let t = cx.table(oid)?;
        let cols: Vec<&Column> = t
            .columns
            .iter()
            .filter(|c| !cx.is_excluded(oid, c.attnum))
            .collect();
        let excl: Vec<&Column> = t
            .columns
            .iter()
            .filter(|c| cx.is_excluded(oid, c.attnum))
            .collect();
        let mut warns = warnings(&cx, oid, role, chains.get(&oid));
        warns.extend(cx.exclusion_notes.get(&oid).into_iter().flatten().cloned());
        // The root is always `poco_root` where its predicate is evaluated (see ROOT_ALIAS).
        let me = if role == Role::Root { ROOT_ALIAS } else { "t" };
        let col_list = if cols.is_empty() {
            "NULL".to_string()
        } else {
            cols.iter()
                .map(|c| format!("{me}.{}", c.ident))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut forward = g.member(oid, me, &g.param_forward(), &mut Counter::default());
        if !forward.contains("$1") {
            // 'all' tables and tables nothing pulls: same one-parameter shape as the others.
            forward = format!("{forward} AND $1::pg_catalog.text IS NOT NULL");
        }
        let owner_param = format!("(poco_p.v)::{key_type}");
        let owners_sql = match role {
            // Owned rows: walk up from the row once, then test the predicate on the root rows
            // reached for each candidate parent (not a walk per candidate).
            Role::Owned => g.chain_owners_sql(oid, &chains[&oid], &owner_param),
            _ => format!(
                "SELECT poco_p.v FROM pg_catalog.unnest($1::pg_catalog.text[]) AS poco_p(v) \
                 WHERE EXISTS (SELECT 1 FROM {} WHERE {})",
                image_record(t, "$2", me),
                g.member(oid, me, &owner_param, &mut Counter::default())
            ),
        };
        let path = match role {
            Role::Root => format!("{} WHERE {}", t.ident, pred_text.trim()),
            Role::Owned => cx.describe_chain(&chains[&oid]),
            Role::Reference(RefMode::All) => "all rows".to_string(),
            Role::Reference(RefMode::Referenced) => {
                let inc = incoming(&cx, oid);
                let selfs = self_edges(&cx, oid);
                if inc.is_empty() {
                    "referenced by no scoped table: no rows".to_string()
                } else {
                    let mut s: Vec<String> = inc
                        .iter()
                        .map(|&i| cx.fk_cols_text(cat.fks[i].child, &cat.fks[i].child_cols))
                        .collect();
                    s.sort();
                    s.dedup();
                    let mut text = format!("rows referenced by {}", s.join(", "));
                    if !selfs.is_empty() {
                        let own: Vec<String> = selfs
                            .iter()
                            .map(|&i| cx.fk_cols_text(oid, &cat.fks[i].child_cols))
                            .collect();
                        text.push_str(&format!(", and recursively by {}", own.join(", ")));
                    }
                    text
                }
            }
        };
        tables.push(ScopedTable {
            oid,
            ident: t.ident.clone(),
            role,
            path,
            chain: chains.get(&oid).cloned().unwrap_or_default(),
            columns: cols.iter().map(|c| c.ident.clone()).collect(),
            all_columns: t.columns.clone(),
            up: chains.get(&oid).and_then(|c| c.first()).map(|&i| {
                let fk = &cat.fks[i];
                let names = |o: Oid, cols: &[i16]| -> Vec<String> {
                    cols.iter()
                        .filter_map(|a| cat.tables[&o].column(*a).map(|c| c.name.clone()))
                        .collect()
                };
                Hop {
                    parent: fk.parent,
                    child_cols: names(fk.child, &fk.child_cols),
                    parent_cols: names(fk.parent, &fk.parent_cols),
                }
            }),
            excluded: excl.iter().map(|c| c.ident.clone()).collect(),
            excluded_attnums: excl.iter().map(|c| c.attnum).collect(),
            fks: fk_verdicts(&cx, oid, role, chains.get(&oid)),
            warnings: warns,
            select_sql: format!(
                "SELECT {col_list} FROM {} {me} WHERE {forward}",
                t.from_item()
            ),
            count_sql: format!(
                "SELECT pg_catalog.count(*) FROM {} {me} WHERE {forward}",
                t.from_item()
            ),
            owners_sql,
        });
    }
    // Undeclared tables on the ownership paths, each with the ways up from it.
    let mut suffixes: BTreeMap<Oid, Vec<Vec<usize>>> = BTreeMap::new();
    for chain in chains.values() {
        for k in 1..chain.len() {
            let p = cat.fks[chain[k]].child;
            if !cx.roles.contains_key(&p) {
                let s = suffixes.entry(p).or_default();
                if !s.contains(&chain[k..].to_vec()) {
                    s.push(chain[k..].to_vec());
                }
            }
        }
    }
    let owner_param = format!("(poco_p.v)::{key_type}");
    let names = |o: Oid, cols: &[i16]| -> Vec<String> {
        cols.iter()
            .filter_map(|a| cat.tables[&o].column(*a).map(|c| c.name.clone()))
            .collect()
    };
    let paths = suffixes
        .into_iter()
        .map(|(oid, ways)| {
            let t = &cat.tables[&oid];
            let first = &cat.fks[ways[0][0]];
            PathTable {
                oid,
                ident: t.ident.clone(),
                all_columns: t.columns.clone(),
                pk: t.pk.as_deref().map(|pk| names(oid, pk)).unwrap_or_default(),
                owners_sql: ways
                    .iter()
                    .map(|w| g.chain_owners_sql(oid, w, &owner_param))
                    .collect(),
                up: Some(Hop {
                    parent: first.parent,
                    child_cols: names(first.child, &first.child_cols),
                    parent_cols: names(first.parent, &first.parent_cols),
                }),
            }
        })
        .collect();
    Ok(Some(Scope {
        root,
        key_column: key_col.ident.clone(),
        key_type,
        predicate: pred_text.clone(),
        tables,
        paths,
    }))
}

/// The columns that never leave, per table, with notes for the preview: each declared
/// exclusion excludes the column with its number and the column with its name (one column,
/// nearly always; both when they differ: see `Exclusion`), and a generated column is
/// excluded with what it reads (its expression would carry the value out), as is one that
/// calls a function outside pg_catalog while anything is excluded (such a function can read
/// any column, whatever volatility it declares).
type ExclusionSets = (BTreeMap<Oid, BTreeSet<i16>>, BTreeMap<Oid, Vec<String>>);

fn effective_exclusions(cat: &Catalog, decls: &Declarations) -> Result<ExclusionSets> {
    let mut sets: BTreeMap<Oid, BTreeSet<i16>> = BTreeMap::new();
    let mut notes: BTreeMap<Oid, Vec<String>> = BTreeMap::new();
    for e in &decls.excluded {
        let Some(t) = cat.tables.get(&e.rel) else {
            return Err(scope_err(
                SqlState::UndefinedTable,
                format!(
                    "a table with excluded columns (OID {}) no longer exists",
                    e.rel
                ),
                format!(
                    "Remove its declarations: SELECT poco_scope_remove({});",
                    e.rel
                ),
            ));
        };
        let by_num = e.attnum.and_then(|a| t.column(a));
        let by_name = t.column_named(&e.name);
        let set = sets.entry(e.rel).or_default();
        let note = notes.entry(e.rel).or_default();
        match (by_num, by_name) {
            (Some(a), Some(b)) if a.attnum == b.attnum => {
                set.insert(a.attnum);
            }
            (Some(a), None) => {
                set.insert(a.attnum);
                note.push(format!(
                    "excluded column \"{}\" is now named {}: it stays excluded",
                    e.name, a.ident
                ));
            }
            (Some(a), Some(b)) => {
                set.insert(a.attnum);
                set.insert(b.attnum);
                note.push(format!(
                    "the exclusion of \"{}\" was declared on column number {}, now {}, while {} has its name: both stay on the platform; declare the exclusion again to settle it",
                    e.name,
                    a.attnum,
                    a.ident,
                    b.ident
                ));
            }
            (None, Some(b)) => {
                set.insert(b.attnum);
                if e.attnum.is_some() {
                    note.push(format!(
                        "excluded column {} was dropped and added again: the new one is excluded too",
                        b.ident
                    ));
                }
            }
            (None, None) => note.push(format!(
                "excluded column \"{}\" no longer exists; the exclusion stays, so a column added under that name stays on the platform too (poco_scope_include_column removes it)",
                e.name
            )),
        }
    }
    let any = !decls.excluded.is_empty();
    for t in cat.tables.values() {
        for c in &t.columns {
            let Some(g) = &c.generated else { continue };
            let declared = sets.get(&t.oid).cloned().unwrap_or_default();
            if declared.contains(&c.attnum) {
                continue;
            }
            let read: Vec<String> = g
                .reads
                .iter()
                .filter(|a| declared.contains(a))
                .filter_map(|a| t.column(*a).map(|x| x.ident.clone()))
                .collect();
            let why = if !read.is_empty() {
                format!(
                    "generated column {} is excluded: its expression reads excluded column {}",
                    c.ident,
                    read.join(", ")
                )
            } else if any && g.calls_user_function {
                format!(
                    "generated column {} is excluded: its expression calls a function outside pg_catalog, which could read an excluded column",
                    c.ident
                )
            } else {
                continue;
            };
            sets.entry(t.oid).or_default().insert(c.attnum);
            notes.entry(t.oid).or_default().push(why);
        }
    }
    Ok((sets, notes))
}

/// A row image (`param`, jsonb) as a record of `t`'s columns, aliased `alias`, read without
/// anyone's code: `jsonb_to_record` with each column's safe type (a domain's CHECK, which
/// `jsonb_populate_record` would run as poco_sync's owner, is not evaluated).
pub fn image_record(t: &Table, param: &str, alias: &str) -> String {
    let defs: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("{} {}", c.ident, c.safe_type))
        .collect();
    format!(
        "pg_catalog.jsonb_to_record({param}::pg_catalog.jsonb) AS {alias}({})",
        defs.join(", ")
    )
}

/// Foreign keys from other scoped tables into reference table `r` that pull rows in
/// (`referenced` mode). Keys using an excluded column pull nothing: that value never leaves.
fn incoming(cx: &Ctx, r: Oid) -> Vec<usize> {
    cx.cat
        .fks
        .iter()
        .enumerate()
        .filter(|(_, fk)| {
            fk.parent == r
                && fk.child != r
                && cx.roles.contains_key(&fk.child)
                && !fk.child_cols.iter().any(|a| cx.is_excluded(fk.child, *a))
        })
        .map(|(i, _)| i)
        .collect()
}

fn self_edges(cx: &Ctx, r: Oid) -> Vec<usize> {
    cx.cat
        .fks
        .iter()
        .enumerate()
        .filter(|(_, fk)| {
            fk.parent == r && fk.child == r && !fk.child_cols.iter().any(|a| cx.is_excluded(r, *a))
        })
        .map(|(i, _)| i)
        .collect()
}

/// A cycle of `referenced` tables (A pulls B pulls A) has no finite compiled form here.
fn check_reference_cycles(cx: &Ctx) -> Result<()> {
    let referenced: BTreeSet<Oid> = cx
        .decls
        .reference
        .iter()
        .filter(|(_, m)| *m == RefMode::Referenced)
        .map(|(o, _)| *o)
        .collect();
    // Edge r -> s when rows of s are pulled by rows of r (r's FK points at s).
    let mut state: BTreeMap<Oid, u8> = BTreeMap::new();
    fn visit(
        cx: &Ctx,
        refs: &BTreeSet<Oid>,
        n: Oid,
        state: &mut BTreeMap<Oid, u8>,
        stack: &mut Vec<Oid>,
    ) -> Option<Vec<Oid>> {
        state.insert(n, 1);
        stack.push(n);
        for fk in cx
            .cat
            .fks
            .iter()
            .filter(|f| f.child == n && f.parent != n && refs.contains(&f.parent))
        {
            if fk.child_cols.iter().any(|a| cx.is_excluded(n, *a)) {
                continue;
            }
            match state.get(&fk.parent).copied().unwrap_or(0) {
                1 => {
                    let pos = stack.iter().position(|x| *x == fk.parent).unwrap();
                    return Some(stack[pos..].to_vec());
                }
                0 => {
                    if let Some(c) = visit(cx, refs, fk.parent, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n, 2);
        None
    }
    for &r in &referenced {
        if state.get(&r).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(cx, &referenced, r, &mut state, &mut Vec::new()) {
                let names: Vec<String> = cycle.iter().map(|o| cx.name(*o)).collect();
                return Err(scope_err(
                    SqlState::InvalidObjectDefinition,
                    format!("reference tables {} reference each other in a cycle", names.join(" → ")),
                    format!(
                        "Declare one of them with mode 'all', e.g. SELECT poco_scope_reference('{}', 'all');",
                        names[0].replace('\'', "''")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn fk_verdicts(cx: &Ctx, oid: Oid, role: Role, chain: Option<&Vec<usize>>) -> Vec<FkVerdict> {
    let mut out = Vec::new();
    for &i in cx.by_child.get(&oid).into_iter().flatten() {
        let fk = &cx.cat.fks[i];
        let text = format!(
            "{}: {} → {}",
            fk.name,
            cx.fk_cols_text(fk.child, &fk.child_cols),
            cx.fk_cols_text(fk.parent, &fk.parent_cols)
        );
        let prole = cx.roles.get(&fk.parent).copied();
        let (sent, reason) =
            if let Some(c) = fk.child_cols.iter().find(|a| cx.is_excluded(oid, **a)) {
                let n = cx.cat.tables[&oid]
                    .column(*c)
                    .map(|c| c.ident.clone())
                    .unwrap_or_default();
                (false, format!("column {n} is excluded"))
            } else if prole.is_none() {
                (false, format!("{} is not in the scope", cx.name(fk.parent)))
            } else if fk.parent_cols.iter().any(|a| cx.is_excluded(fk.parent, *a)) {
                (false, "a referenced column is excluded".to_string())
            } else if role == Role::Owned && chain.is_some_and(|c| c.first() == Some(&i)) {
                (true, "ownership path".to_string())
            } else if let Some(Role::Reference(_)) = prole {
                (true, "reference table".to_string())
            } else if let Role::Reference(_) = role {
                (
                    false,
                    "a reference table pointing into an account".to_string(),
                )
            } else {
                (
                    false,
                    "not guaranteed by the scope: the referenced row may belong to another account"
                        .to_string(),
                )
            };
        out.push(FkVerdict {
            name: fk.name.clone(),
            text,
            sent,
            reason,
        });
    }
    out
}

fn warnings(cx: &Ctx, oid: Oid, role: Role, chain: Option<&Vec<usize>>) -> Vec<String> {
    let mut w = Vec::new();
    let t = &cx.cat.tables[&oid];
    if t.pk.is_none() {
        w.push(format!(
            "{} has no primary key: continuous sync needs one to identify rows",
            t.ident
        ));
    }
    if role == Role::Owned {
        for &i in chain.into_iter().flatten() {
            let fk = &cx.cat.fks[i];
            let c = &cx.cat.tables[&fk.child];
            let n = fk.child_cols.len();
            let want: BTreeSet<i16> = fk.child_cols.iter().copied().collect();
            let indexed = c.indexes.iter().any(|ix| {
                ix.len() >= n && ix[..n].iter().copied().collect::<BTreeSet<i16>>() == want
            });
            if !indexed {
                let cols = c.idents(&fk.child_cols).join(", ");
                w.push(format!(
                    "no index on {}({cols}), used by this table's ownership path: finding one account's rows reads the whole table; CREATE INDEX ON {} ({cols});",
                    c.ident, c.ident
                ));
            }
        }
    }
    w
}

#[derive(Default)]
struct Counter(usize);
impl Counter {
    fn next(&mut self, p: &str) -> String {
        self.0 += 1;
        format!("{p}{}", self.0)
    }
}

struct Gen<'a> {
    cx: &'a Ctx<'a>,
    chains: &'a BTreeMap<Oid, Vec<usize>>,
    pred: &'a Predicate,
    key_type: &'a str,
}

fn tuple(alias: &str, idents: &[String]) -> String {
    let v: Vec<String> = idents.iter().map(|i| format!("{alias}.{i}")).collect();
    if v.len() == 1 {
        v[0].clone()
    } else {
        format!("({})", v.join(", "))
    }
}

/// `alias.cols` is among the rows of `sub`. One column: `= ANY (ARRAY(sub))`, which runs the
/// subquery once and probes the index with the keys it found, whatever the planner's estimate
/// of its size; several columns: a row-wise `IN`. NULL keys match nothing either way.
fn in_set(alias: &str, idents: &[String], sub: &str) -> String {
    if idents.len() == 1 {
        format!("{alias}.{} = ANY (ARRAY({sub}))", idents[0])
    } else {
        format!("{} IN ({sub})", tuple(alias, idents))
    }
}

impl Gen<'_> {
    fn param_forward(&self) -> String {
        format!("($1::pg_catalog.text)::{}", self.key_type)
    }

    /// A boolean SQL condition: the row `alias` of table `oid` is in the parent's scope.
    fn member(&self, oid: Oid, alias: &str, param: &str, n: &mut Counter) -> String {
        let cat = self.cx.cat;
        match self.cx.roles[&oid] {
            Role::Root => format!("({})", self.pred.with_param(param)),
            Role::Owned => self.chain_member(&self.chains[&oid], alias, param, n),
            Role::Reference(RefMode::All) => "true".to_string(),
            Role::Reference(RefMode::Referenced) => {
                let t = &cat.tables[&oid];
                let selfs = self_edges(self.cx, oid);
                if selfs.is_empty() {
                    return self.pulled(oid, alias, param, n);
                }
                // Rows pulled from outside, then everything they reach through the self-keys.
                let pk =
                    t.pk.clone()
                        .expect("checked: self-referencing reference table has a pk");
                let pk_ids = t.idents(&pk);
                let cte = n.next("poco_rec");
                let base = n.next("b");
                let next = n.next("n");
                let mut carried: Vec<String> = pk_ids.clone();
                let mut joins = Vec::new();
                for &i in &selfs {
                    let fk = &cat.fks[i];
                    let child = t.idents(&fk.child_cols);
                    let start = carried.len();
                    carried.extend(child.iter().cloned());
                    let names: Vec<String> =
                        (start..carried.len()).map(|k| format!("c{k}")).collect();
                    let parent = t.idents(&fk.parent_cols);
                    let conds: Vec<String> = parent
                        .iter()
                        .zip(names.iter())
                        .map(|(p, c)| format!("{next}.{p} = {cte}.{c}"))
                        .collect();
                    joins.push(format!("({})", conds.join(" AND ")));
                }
                let colnames: Vec<String> = (0..carried.len()).map(|k| format!("c{k}")).collect();
                let sel = |a: &str| {
                    carried
                        .iter()
                        .map(|c| format!("{a}.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let pkc: Vec<String> = (0..pk_ids.len()).map(|k| format!("{cte}.c{k}")).collect();
                // The recursive step is a LATERAL subquery kept apart by OFFSET 0, so each
                // reached row costs one index probe instead of a hash join over the table.
                let lat = n.next("x");
                let sub = format!(
                    "WITH RECURSIVE {cte}({}) AS (SELECT {} FROM {} {base} WHERE {} UNION SELECT {lat}.* FROM {cte} CROSS JOIN LATERAL (SELECT {} FROM {} {next} WHERE {} OFFSET 0) {lat}) SELECT {} FROM {cte}",
                    colnames.join(", "),
                    sel(&base),
                    t.from_item(),
                    self.pulled(oid, &base, param, n),
                    sel(&next),
                    t.from_item(),
                    joins.join(" OR "),
                    pkc.join(", ")
                );
                in_set(alias, &pk_ids, &sub)
            }
        }
    }

    /// Rows of reference table `oid` that in-scope rows of other scoped tables point at.
    fn pulled(&self, oid: Oid, alias: &str, param: &str, n: &mut Counter) -> String {
        let cat = self.cx.cat;
        let t = &cat.tables[&oid];
        let mut groups: BTreeMap<Vec<i16>, Vec<String>> = BTreeMap::new();
        for i in incoming(self.cx, oid) {
            let fk = &cat.fks[i];
            let child = &cat.tables[&fk.child];
            let a = if Some(fk.child) == self.cx.root {
                ROOT_ALIAS.to_string()
            } else {
                n.next("s")
            };
            let cond = self.member(fk.child, &a, param, n);
            let cols: Vec<String> = child
                .idents(&fk.child_cols)
                .iter()
                .map(|c| format!("{a}.{c}"))
                .collect();
            groups
                .entry(fk.parent_cols.clone())
                .or_default()
                .push(format!(
                    "SELECT {} FROM {} {a} WHERE {cond}",
                    cols.join(", "),
                    child.from_item()
                ));
        }
        if groups.is_empty() {
            return "false".to_string();
        }
        let parts: Vec<String> = groups
            .into_iter()
            .map(|(pcols, sels)| in_set(alias, &t.idents(&pcols), &sels.join(" UNION ALL ")))
            .collect();
        if parts.len() == 1 {
            parts.into_iter().next().unwrap()
        } else {
            format!("({})", parts.join(" OR "))
        }
    }

    /// The values of the last foreign key's referencing columns on the path from row `alias`
    /// of `chain[0]`'s child up towards the root: a subquery, one index probe per step.
    fn chain_reach(&self, chain: &[usize], alias: &str, n: &mut Counter) -> String {
        let cat = self.cx.cat;
        let fk = &cat.fks[chain[0]];
        let child = &cat.tables[&fk.child];
        let ccols = child.idents(&fk.child_cols);
        if chain.len() == 1 {
            let cols: Vec<String> = ccols.iter().map(|c| format!("{alias}.{c}")).collect();
            return format!("SELECT {}", cols.join(", "));
        }
        let parent = &cat.tables[&fk.parent];
        let a = n.next("u");
        let r = n.next("r");
        let inner = self.chain_reach(&chain[1..], &a, n);
        let conds: Vec<String> = parent
            .idents(&fk.parent_cols)
            .iter()
            .zip(ccols.iter())
            .map(|(p, c)| format!("{a}.{p} = {alias}.{c}"))
            .collect();
        format!(
            "SELECT {r}.* FROM {} {a} CROSS JOIN LATERAL ({inner}) {r} WHERE {}",
            parent.from_item(),
            conds.join(" AND ")
        )
    }

    /// Which of the candidate parents (`$1`, text[]) hold the row `$2` (jsonb) of owned table
    /// `oid`: the root rows the row reaches up its ownership path are found once (a
    /// materialized CTE), then the predicate is tested on them for each candidate. Same meaning
    /// as `member`, evaluated from the row upwards; the cost of a candidate is one predicate
    /// test, not one walk (the planner otherwise walked the path once per candidate).
    fn chain_owners_sql(&self, oid: Oid, chain: &[usize], param: &str) -> String {
        let cat = self.cx.cat;
        let last = &cat.fks[*chain.last().expect("an owned table has a path")];
        let root = &cat.tables[&last.parent];
        let mut n = Counter::default();
        let o = n.next("w");
        let reach = self.chain_reach(chain, "t", &mut n);
        let image = image_record(&cat.tables[&oid], "$2", "t");
        let r = ROOT_ALIAS;
        format!(
            "WITH poco_r AS MATERIALIZED (SELECT {o}.* FROM {} {o} WHERE {} IN \
               (SELECT poco_x.* FROM {image} CROSS JOIN LATERAL ({reach}) poco_x)) \
             SELECT poco_p.v FROM pg_catalog.unnest($1::pg_catalog.text[]) AS poco_p(v) \
              WHERE EXISTS (SELECT 1 FROM poco_r {r} WHERE ({})) \
             UNION ALL SELECT NULL WHERE NOT EXISTS (SELECT 1 FROM poco_r)",
            root.from_item(),
            tuple(&o, &root.idents(&last.parent_cols)),
            self.pred.with_param(param)
        )
    }

    fn chain_member(&self, chain: &[usize], alias: &str, param: &str, n: &mut Counter) -> String {
        let cat = self.cx.cat;
        let fk = &cat.fks[chain[0]];
        let child = &cat.tables[&fk.child];
        let parent = &cat.tables[&fk.parent];
        let a = if chain.len() == 1 {
            ROOT_ALIAS.to_string()
        } else {
            n.next("o")
        };
        let inner = if chain.len() == 1 {
            debug_assert_eq!(Some(fk.parent), self.cx.root);
            format!("({})", self.pred.with_param(param))
        } else {
            self.chain_member(&chain[1..], &a, param, n)
        };
        let pcols: Vec<String> = parent
            .idents(&fk.parent_cols)
            .iter()
            .map(|c| format!("{a}.{c}"))
            .collect();
        let sub = format!(
            "SELECT {} FROM {} {a} WHERE {inner}",
            pcols.join(", "),
            parent.from_item()
        );
        in_set(alias, &child.idents(&fk.child_cols), &sub)
    }
}
