//! What a push creates on the learner. The platform describes each scoped table and the types
//! it uses as JSON (built by catalog queries in `src/push/schema.rs`, with `search_path` set to
//! `pg_catalog` so every name in them is schema-qualified); this module decides what of it
//! the learner gets and renders the statements. Pure, so it is unit-tested without a server.
//!
//! Order of one push, all in one learner transaction: drop the previous copies, create the
//! types, create the tables with columns only, COPY the rows, then add keys, checks and indexes
//! (building an index once over all rows is far cheaper than maintaining it row by row), then
//! the foreign keys, then set the sequences past the data.

use serde::Deserialize;

/// A column that leaves the platform.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ColumnDef {
    /// quote_ident(attname)
    pub ident: String,
    /// format_type(atttypid, atttypmod), schema-qualified when not in pg_catalog.
    #[serde(rename = "type")]
    pub type_sql: String,
    pub not_null: bool,
    /// pg_get_expr of the default, when the learner can evaluate it (no platform functions).
    pub default: Option<String>,
    /// pg_attribute.attidentity: "" | "a" (always) | "d" (by default)
    #[serde(default)]
    pub identity: String,
    /// COLLATE clause when the column's collation differs from its type's default.
    #[serde(default)]
    pub collation: Option<String>,
}

/// A constraint or index of a scoped table that the learner can rebuild.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ConstraintDef {
    /// quote_ident(conname)
    pub ident: String,
    /// 'p' primary key, 'u' unique, 'c' check, 'x' exclusion, 'f' foreign key
    pub kind: String,
    /// pg_get_constraintdef
    pub def: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SequenceDef {
    /// schema.sequence, quoted
    pub ident: String,
    /// The owning column (quote_ident)
    pub column: String,
    /// `AS bigint INCREMENT BY 1 MINVALUE 1 MAXVALUE … START WITH 1 CACHE 1 NO CYCLE`
    pub options: String,
}

/// One scoped table as the learner will have it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TableDef {
    /// quote_ident(nspname)
    pub schema: String,
    /// schema.table, quoted
    pub ident: String,
    pub columns: Vec<ColumnDef>,
    /// Primary key, unique, check and exclusion constraints (portable, on sent columns only).
    pub constraints: Vec<ConstraintDef>,
    /// CREATE INDEX statements of indexes that back no constraint.
    pub indexes: Vec<String>,
    /// Sequences owned by sent columns (serial); identity columns bring their own.
    pub sequences: Vec<SequenceDef>,
    /// What was left out and why (a check using a platform function, a default calling one…).
    #[serde(default)]
    pub left_out: Vec<String>,
}

/// A user-defined type a scoped column uses (directly, through an array, a domain or a
/// composite), in creation order.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TypeDef {
    /// schema.type, quoted
    pub ident: String,
    pub schema: String,
    /// 'e' enum, 'd' domain, 'c' composite, 'r' range, 'b' base
    pub kind: String,
    #[serde(default)]
    pub labels: Vec<String>,
    /// domain: base type; range: subtype
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub not_null: bool,
    #[serde(default)]
    pub default: Option<String>,
    /// domain CHECK constraints: (quoted name, definition)
    #[serde(default)]
    pub checks: Vec<(String, String)>,
    /// domain CHECK constraints that call a platform function: left out (quoted names)
    #[serde(default)]
    pub checks_left_out: Vec<String>,
    /// composite attributes: (quoted name, type)
    #[serde(default)]
    pub attributes: Vec<(String, String)>,
    /// The extension that provides the type, if any: the learner gets the extension.
    #[serde(default)]
    pub extension: Option<String>,
}

/// Quote a string as an SQL literal (standard_conforming_strings on, as on every server we
/// support). Backslashes are ordinary characters there; only quotes are doubled.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl TypeDef {
    /// Statements that create the type on the learner (after its previous copy was dropped).
    pub fn create_sql(&self) -> Result<String, String> {
        match self.kind.as_str() {
            _ if self.extension.is_some() => Ok(format!(
                "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}",
                quote_ident_simple(self.extension.as_deref().unwrap()),
                self.schema
            )),
            "e" => Ok(format!(
                "CREATE TYPE {} AS ENUM ({})",
                self.ident,
                self.labels.iter().map(|l| literal(l)).collect::<Vec<_>>().join(", ")
            )),
            "d" => {
                let mut s = format!(
                    "CREATE DOMAIN {} AS {}",
                    self.ident,
                    self.base.as_deref().ok_or("domain without a base type")?
                );
                if let Some(d) = &self.default {
                    s.push_str(&format!(" DEFAULT {d}"));
                }
                if self.not_null {
                    s.push_str(" NOT NULL");
                }
                for (name, def) in &self.checks {
                    s.push_str(&format!(" CONSTRAINT {name} {def}"));
                }
                Ok(s)
            }
            "c" => Ok(format!(
                "CREATE TYPE {} AS ({})",
                self.ident,
                self.attributes.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", ")
            )),
            "r" => Ok(format!(
                "CREATE TYPE {} AS RANGE (subtype = {})",
                self.ident,
                self.base.as_deref().ok_or("range without a subtype")?
            )),
            other => Err(format!(
                "type {} (kind '{other}') is defined by C code on the platform and cannot be recreated on the learner",
                self.ident
            )),
        }
    }

    /// `DROP TYPE IF EXISTS` for a previous copy (not for extension types: the extension stays).
    pub fn drop_sql(&self) -> Option<String> {
        if self.extension.is_some() {
            None
        } else if self.kind == "d" {
            Some(format!("DROP DOMAIN IF EXISTS {}", self.ident))
        } else {
            Some(format!("DROP TYPE IF EXISTS {}", self.ident))
        }
    }
}

/// Quote an identifier that comes from the catalog (extension names): like quote_ident.
pub fn quote_ident_simple(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

impl TableDef {
    /// The column list of the COPY, in the order the platform's select returns them.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.ident.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Sequences first (serial defaults name them), then the table with its columns only.
    pub fn create_sql(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.sequences {
            out.push(format!("CREATE SEQUENCE {} {}", s.ident, s.options));
        }
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let mut s = format!("{} {}", c.ident, c.type_sql);
                if let Some(coll) = &c.collation {
                    s.push_str(&format!(" COLLATE {coll}"));
                }
                match c.identity.as_str() {
                    "a" => s.push_str(" GENERATED ALWAYS AS IDENTITY"),
                    "d" => s.push_str(" GENERATED BY DEFAULT AS IDENTITY"),
                    _ => {
                        if let Some(d) = &c.default {
                            s.push_str(&format!(" DEFAULT {d}"));
                        }
                    }
                }
                if c.not_null {
                    s.push_str(" NOT NULL");
                }
                s
            })
            .collect();
        out.push(format!("CREATE TABLE {} ({})", self.ident, cols.join(", ")));
        for s in &self.sequences {
            out.push(format!(
                "ALTER SEQUENCE {} OWNED BY {}.{}",
                s.ident, self.ident, s.column
            ));
        }
        out
    }

    /// Keys, checks, exclusions and the other indexes, built after the rows are in.
    pub fn index_sql(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .constraints
            .iter()
            .filter(|c| c.kind != "f")
            .map(|c| {
                format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {}",
                    self.ident, c.ident, c.def
                )
            })
            .collect();
        // A partitioned parent's index is defined ON ONLY; the learner's table is plain.
        out.extend(
            self.indexes
                .iter()
                .map(|d| d.replacen(" ON ONLY ", " ON ", 1)),
        );
        out
    }

    /// `setval` for every sequence the table owns (serial and identity), past the data.
    pub fn sequence_sql(&self) -> Vec<String> {
        let mut cols: Vec<&str> = self.sequences.iter().map(|s| s.column.as_str()).collect();
        cols.extend(
            self.columns
                .iter()
                .filter(|c| !c.identity.is_empty())
                .map(|c| c.ident.as_str()),
        );
        cols.iter()
            .map(|col| {
                format!(
                    "SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence({}, {}), \
                     COALESCE(pg_catalog.max({col}), 1), pg_catalog.max({col}) IS NOT NULL) FROM {}",
                    literal(&self.ident),
                    literal(col),
                    self.ident
                )
            })
            .collect()
    }
}

/// The learner's foreign keys, added once every table is loaded.
/// The learner's foreign keys are at least DEFERRABLE (initially immediate, as on the platform
/// unless it says otherwise), so a sync batch can apply its rows in any order with the keys
/// checked at its commit.
pub fn foreign_key_sql(table: &str, fk: &ConstraintDef) -> String {
    if fk.def.contains(" DEFERRABLE") {
        format!("ALTER TABLE {table} ADD CONSTRAINT {} {}", fk.ident, fk.def)
    } else {
        format!(
            "ALTER TABLE {table} ADD CONSTRAINT {} {} DEFERRABLE",
            fk.ident, fk.def
        )
    }
}

/// Append one value in COPY text format: backslash, tab, newline and carriage return escaped.
pub fn copy_escape_into(out: &mut Vec<u8>, value: &[u8]) {
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// The learner's bookkeeping schema, created if missing (same transaction as the data).
pub const BOOKKEEPING_SQL: &[&str] = &[
    "CREATE SCHEMA IF NOT EXISTS poco_sync",
    "CREATE TABLE IF NOT EXISTS poco_sync.snapshot (\
        target_id bigint NOT NULL, parent_id text NOT NULL, job_id bigint NOT NULL, \
        platform text NOT NULL, platform_system_identifier text NOT NULL, \
        pushed_at timestamptz NOT NULL, tables integer NOT NULL, rows bigint NOT NULL, \
        bytes bigint NOT NULL, backup_schema text)",
    "COMMENT ON TABLE poco_sync.snapshot IS 'Written by poco_sync: the last full push this database received (one row)'",
    "CREATE TABLE IF NOT EXISTS poco_sync.tables (\
        table_name text PRIMARY KEY, rows bigint NOT NULL, pushed_at timestamptz NOT NULL)",
    "COMMENT ON TABLE poco_sync.tables IS 'Written by poco_sync: the tables the last push created here'",
    "CREATE TABLE IF NOT EXISTS poco_sync.position (\
        position text NOT NULL, updated_at timestamptz NOT NULL, batches bigint NOT NULL DEFAULT 0)",
    "COMMENT ON TABLE poco_sync.position IS 'Written by poco_sync: the platform snapshot whose state this database holds (one row)'",
];

/// Delay before retry `attempt` (1-based) of a transient failure: base · 2^(attempt-1),
/// capped at 5 minutes.
pub fn backoff_ms(base_ms: u64, attempt: u32) -> u64 {
    let factor = 1u64 << attempt.saturating_sub(1).min(20);
    base_ms.saturating_mul(factor).min(300_000)
}

/// SQLSTATEs of the learner that a retry may fix: connection trouble, the server shutting
/// down or starting, too many connections, serialization failures and deadlocks, lock timeouts.
pub fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "53400" | "40001" | "40P01" | "55P03"
                // The learner cancelled the statement (an operator's pg_cancel_backend, its
                // statement_timeout): only poco_cancel cancels a job.
                | "57014"
        )
}

/// What the operator can do about a learner's error, for the common ones the learner gives no
/// hint for (shown with the error in poco_status and poco.jobs).
pub fn learner_hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "53100" => "The learner's disk is full: free space there (or give the database more). Nothing was applied in part; continuous sync retries by itself and catches up.",
        "53200" => "The learner's server ran out of memory: continuous sync retries by itself; lower poco.sync_max_backlog if it keeps happening.",
        "53300" => "The learner has no free connection slot: raise its max_connections or close other sessions there; poco_sync retries by itself.",
        "42501" => "The target's user lacks a privilege on the learner's copy: grant it there (or use the user that owns the copy). Continuous sync retries by itself.",
        "28000" | "28P01" => "The learner refused the target's user: check its name, password and LOGIN right there, or replace the target (poco_remove_target, then poco_add_target or poco_enable_sync with the new URL).",
        "3D000" => "The learner's database does not exist: create it there, or replace the target with the right URL.",
        "57P01" | "57P02" | "57P03" => "The learner's server is shutting down or starting up: poco_sync retries by itself.",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_learner_errors_have_a_hint() {
        for code in [
            "53100", "42501", "28000", "28P01", "3D000", "53300", "57P01",
        ] {
            assert!(
                learner_hint(code).is_some_and(|h| h.ends_with('.')),
                "{code}"
            );
        }
        assert_eq!(learner_hint("23505"), None);
    }

    fn esc(s: &str) -> String {
        let mut v = Vec::new();
        copy_escape_into(&mut v, s.as_bytes());
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn copy_escape_only_the_four_specials() {
        assert_eq!(esc("plain ü"), "plain ü");
        assert_eq!(esc("a\tb\nc\\d\re"), "a\\tb\\nc\\\\d\\re");
        assert_eq!(esc("\\N"), "\\\\N");
        assert_eq!(esc(""), "");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(500, 1), 500);
        assert_eq!(backoff_ms(500, 2), 1000);
        assert_eq!(backoff_ms(500, 4), 4000);
        assert_eq!(backoff_ms(500, 40), 300_000);
    }

    #[test]
    fn transient_codes() {
        for c in ["08006", "08001", "57P01", "53300", "40001", "57014"] {
            assert!(transient_sqlstate(c), "{c}");
        }
        for c in ["42P01", "23505", "XX000", "42501"] {
            assert!(!transient_sqlstate(c), "{c}");
        }
    }

    #[test]
    fn table_ddl() {
        let t: TableDef = serde_json::from_value(serde_json::json!({
            "schema": "app", "ident": "app.\"Odd Name\"",
            "columns": [
                {"ident": "id", "type": "bigint", "not_null": true, "default": "nextval('app.\"Odd Name_id_seq\"'::regclass)"},
                {"ident": "n", "type": "integer", "not_null": false, "default": null, "identity": "d"},
                {"ident": "s", "type": "app.mood[]", "not_null": false, "default": "'{}'::app.mood[]"}
            ],
            "constraints": [
                {"ident": "\"Odd Name_pkey\"", "kind": "p", "def": "PRIMARY KEY (id)"},
                {"ident": "fk", "kind": "f", "def": "FOREIGN KEY (n) REFERENCES app.x(id)"}
            ],
            "indexes": ["CREATE INDEX i ON ONLY app.\"Odd Name\" USING btree (n)"],
            "sequences": [{"ident": "app.\"Odd Name_id_seq\"", "column": "id", "options": "AS bigint"}]
        }))
        .unwrap();
        let c = t.create_sql();
        assert_eq!(c[0], "CREATE SEQUENCE app.\"Odd Name_id_seq\" AS bigint");
        assert!(
            c[1].starts_with("CREATE TABLE app.\"Odd Name\" (id bigint DEFAULT nextval("),
            "{}",
            c[1]
        );
        assert!(
            c[1].contains("n integer GENERATED BY DEFAULT AS IDENTITY,"),
            "{}",
            c[1]
        );
        assert_eq!(
            c[2],
            "ALTER SEQUENCE app.\"Odd Name_id_seq\" OWNED BY app.\"Odd Name\".id"
        );
        let i = t.index_sql();
        assert_eq!(i.len(), 2, "foreign keys come later: {i:?}");
        assert_eq!(i[1], "CREATE INDEX i ON app.\"Odd Name\" USING btree (n)");
        let s = t.sequence_sql();
        assert_eq!(s.len(), 2);
        assert!(
            s[0].contains("pg_get_serial_sequence('app.\"Odd Name\"', 'id')"),
            "{}",
            s[0]
        );
    }

    #[test]
    fn type_ddl() {
        let e = TypeDef {
            ident: "app.mood".into(),
            schema: "app".into(),
            kind: "e".into(),
            labels: vec!["ok".into(), "it's".into()],
            base: None,
            not_null: false,
            default: None,
            checks: vec![],
            checks_left_out: vec![],
            attributes: vec![],
            extension: None,
        };
        assert_eq!(
            e.create_sql().unwrap(),
            "CREATE TYPE app.mood AS ENUM ('ok', 'it''s')"
        );
        let d = TypeDef {
            kind: "d".into(),
            base: Some("integer".into()),
            not_null: true,
            checks: vec![("pos".into(), "CHECK ((VALUE > 0))".into())],
            checks_left_out: vec![],
            ..e.clone()
        };
        assert_eq!(
            d.create_sql().unwrap(),
            "CREATE DOMAIN app.mood AS integer NOT NULL CONSTRAINT pos CHECK ((VALUE > 0))"
        );
        assert_eq!(d.drop_sql().unwrap(), "DROP DOMAIN IF EXISTS app.mood");
        let x = TypeDef {
            extension: Some("citext".into()),
            schema: "public".into(),
            ..e.clone()
        };
        assert_eq!(
            x.create_sql().unwrap(),
            "CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA public"
        );
        assert!(x.drop_sql().is_none());
        assert!(TypeDef {
            kind: "b".into(),
            ..e
        }
        .create_sql()
        .is_err());
    }
}
