//! Batch building: the statements that bring one learner from its position to the pass's
//! snapshot, read through the parent's scope.

use super::*;

/// Bring one target from its position to `s`.
pub(super) fn sync_target(
    plans: &mut Plans,
    sc: &Scope,
    pks: &HashMap<u32, Vec<String>>,
    fks: &BTreeSet<(u32, u32)>,
    t: &Target,
    parent: Option<u32>,
    changes: &[(&Keyed, &Owners)],
) -> Step {
    if changes.is_empty() {
        return Step::Done(Outcome::Advanced);
    }
    let n = changes.len() as i64;
    if changes.iter().any(|(c, _)| c.op == b'T') {
        return Step::Done(Outcome::Resnapshot("a scoped table was truncated".into()));
    }
    sync_keys(plans, sc, pks, fks, t, parent, changes, n)
}

pub(super) fn sync_keys(
    plans: &mut Plans,
    sc: &Scope,
    pks: &HashMap<u32, Vec<String>>,
    fks: &BTreeSet<(u32, u32)>,
    t: &Target,
    parent: Option<u32>,
    changes: &[(&Keyed, &Owners)],
    n: i64,
) -> Step {
    // Keys touched, per table.
    let mut touched: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    // Keys of rows that existed before the batch and were updated (not inserted in it): if one
    // changed family, what it owns changed family with it.
    let mut updated: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut inserted: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    // Tables whose changed rows' former owners are not known: the learner drops what of them
    // is not in its family's scope now, told by its family's own keys, never by the changed
    // keys (which may be another family's).
    let mut reconcile: BTreeSet<u32> = BTreeSet::new();
    // Keys of changes whose attribution failed (attribution::Side::Failed): read through the
    // family's scope at S, so upserted only if the family holds the row, and never named to
    // the learner otherwise (reconcile deletes what it should no longer hold). Updated ones
    // the family holds are checked for a move into it, as `updated` keys are.
    let mut probed: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut probed_updated: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (
        Keyed {
            rel, op, old, new, ..
        },
        owners,
    ) in changes.iter().copied()
    {
        if owners.failed() {
            // Whom the row belonged to, or belongs to, is not known: the family reconciles
            // the table and every table owned through it (the row may have moved family,
            // with what it owns).
            for r in at_or_below(sc, *rel) {
                reconcile.insert(r);
                touched.entry(r).or_default();
            }
            if sc.table(*rel).is_some() {
                for k in [old, new].into_iter().flatten() {
                    if !key_is_whole(k) {
                        let name = sc.table(*rel).map(|t| t.ident.as_str()).unwrap_or("?");
                        return Step::Done(Outcome::Resnapshot(format!(
                            "a change of {name} could not be read: a new snapshot copies the rows"
                        )));
                    }
                    probed.entry(*rel).or_default().insert(k.to_string());
                    if *op == b'U' {
                        probed_updated.entry(*rel).or_default().insert(k.to_string());
                    }
                }
            }
        }
        // (A path table's changes only move rows or tell old owners: nothing of it is sent.)
        let Some(pk) = pks.get(rel).filter(|_| sc.table(*rel).is_some()) else {
            continue;
        };
        if pk.is_empty() {
            return Step::Done(Outcome::Broken {
                error: format!("table {rel} has no primary key: it cannot be synced"),
                changes: n,
            });
        }
        let (send_old, send_new, unsure) = owners.for_parent(parent);
        if unsure {
            reconcile.insert(*rel);
            touched.entry(*rel).or_default();
        }
        let old = old.as_ref().filter(|_| send_old);
        let new = new.as_ref().filter(|_| send_new);
        for k in [old, new].into_iter().flatten() {
            let k = k.to_string();
            match op {
                b'U' => updated.entry(*rel).or_default().insert(k.clone()),
                b'I' => inserted.entry(*rel).or_default().insert(k.clone()),
                _ => false,
            };
            touched.entry(*rel).or_default().insert(k);
        }
    }
    let mut membership: Vec<MembershipCheck> = Vec::new();
    // Reference tables to re-check: touched ones, and those a touched table (or one re-checked)
    // points at: new references arrive, rows nothing points at any more leave.
    let mut recheck: BTreeSet<u32> = BTreeSet::new();
    loop {
        let before = recheck.len();
        for table in sc
            .tables
            .iter()
            .filter(|t| matches!(t.role, Role::Reference(_)))
        {
            let r = table.oid;
            if touched.contains_key(&r)
                || fks.iter().any(|(from, to)| {
                    *to == r && *from != r && (touched.contains_key(from) || recheck.contains(from))
                })
            {
                recheck.insert(r);
            }
        }
        if recheck.len() == before {
            break;
        }
    }
    // The learner's statements: deletes of touched keys, upserts of the rows in scope at S.
    let mut stmts: Vec<String> = Vec::new();
    for table in &sc.tables {
        let pk = &pks[&table.oid];
        let pk_list = pk
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let k_list = pk
            .iter()
            .map(|c| format!("k.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let t_list = pk
            .iter()
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let reference = matches!(table.role, Role::Reference(_));
        let keys: Option<String> = touched.get(&table.oid).map(|k| {
            let probe = probed.get(&table.oid).into_iter().flatten();
            let all: BTreeSet<&String> = k.iter().chain(probe).collect();
            format!("[{}]", all.into_iter().cloned().collect::<Vec<_>>().join(","))
        });
        if (keys.is_none() && !reference) || (reference && !recheck.contains(&table.oid)) {
            continue;
        }
        // Rows of the parent's scope at S: the touched ones, or (reference tables) all; and
        // their keys apart (the rows go to the learner as text, never parsed here).
        // Keys as text (their output form), the form the images' keys have.
        let key_agg = format!(
            "pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object({}))::text",
            pk.iter()
                .map(|c| format!(
                    "{}, {}",
                    literal(c),
                    text_of(&format!("s.{}", quote_ident(c)))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row_json = row_json(table, "s");
        let rows_sql = match &keys {
            Some(_) if !reference => {
                // `column = ANY (array)` per key column is pushed down into the scope's query,
                // where the primary key's index finds the touched rows (a semi-join against
                // the key list is not, and the planner then read the family's rows whole);
                // with several key columns the exact tuples are checked as well.
                let keyset = format!(
                    "pg_catalog.jsonb_to_recordset($2::pg_catalog.jsonb) AS k({})",
                    pk.iter()
                        .map(|c| format!("{} {}", quote_ident(c), safe_type(table, c)))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let mut conds: Vec<String> = pk
                    .iter()
                    .map(|c| {
                        format!(
                            "s.{c} = ANY (ARRAY(SELECT k.{c} FROM {keyset}))",
                            c = quote_ident(c)
                        )
                    })
                    .collect();
                if pk.len() > 1 {
                    conds.push(format!(
                        "({}) IN (SELECT {k_list} FROM {keyset})",
                        pk.iter()
                            .map(|c| format!("s.{}", quote_ident(c)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                format!(
                    "SELECT pg_catalog.jsonb_agg({row_json})::text, {key_agg} FROM ({}) s WHERE {}",
                    table.select_sql,
                    conds.join(" AND ")
                )
            }
            _ => format!(
                "SELECT pg_catalog.jsonb_agg({row_json})::text, {key_agg} FROM ({}) s",
                table.select_sql
            ),
        };
        let keys_text = keys.clone().unwrap_or_else(|| "[]".into());
        let read = select_kept_cols(
            plans,
            &rows_sql,
            &[PgBuiltInOids::TEXTOID, PgBuiltInOids::TEXTOID],
            &[t.parent.as_str().into(), keys_text.as_str().into()],
        );
        // (the rows as JSON text, their keys); no row of the scope among the keys: NULLs.
        let (rows_text, row_keys) = match read {
            Ok(mut v) if !v.is_empty() => {
                let mut cols = v.swap_remove(0).into_iter();
                (
                    cols.next().flatten().unwrap_or_else(|| "[]".into()),
                    cols.next().flatten().unwrap_or_else(|| "[]".into()),
                )
            }
            Ok(_) => ("[]".into(), "[]".into()),
            Err(e) => {
                return Step::Done(Outcome::Broken {
                    error: format!("reading {}: {e}", table.ident),
                    changes: n,
                })
            }
        };
        let rows_lit = literal(&rows_text);
        drop(rows_text);
        // The keys of the rows in scope at S.
        let in_now: BTreeSet<String> = match serde_json::from_str::<Vec<Value>>(&row_keys) {
            Ok(a) => a.iter().map(|r| key_of(pk, r)).collect(),
            Err(e) => {
                return Step::Done(Outcome::Broken {
                    error: format!("reading {}: {e}", table.ident),
                    changes: n,
                })
            }
        };
        drop(row_keys);
        let none = BTreeSet::new();
        let probed_in: BTreeSet<String> = probed_updated
            .get(&table.oid)
            .unwrap_or(&none)
            .intersection(&in_now)
            .cloned()
            .collect();
        if let (false, Some(upd)) = (
            reference,
            updated
                .get(&table.oid)
                .or((!probed_in.is_empty()).then_some(&none)),
        ) {
            let upd: BTreeSet<String> = upd
                .difference(inserted.get(&table.oid).unwrap_or(&none))
                .cloned()
                .chain(probed_in)
                .collect();
            if !upd.is_empty() {
                let join = |keys: &BTreeSet<&String>| {
                    format!(
                        "FROM {} t JOIN pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k ON ({t_list}) = ({k_list})",
                        table.ident,
                        table.ident,
                        literal(&format!("[{}]", keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",")))
                    )
                };
                // Moved out: updated, not in scope now, still on the learner. Moved in: updated,
                // in scope now, not on the learner.
                let out_keys: BTreeSet<&String> =
                    upd.iter().filter(|k| !in_now.contains(*k)).collect();
                let in_keys: BTreeSet<&String> =
                    upd.iter().filter(|k| in_now.contains(*k)).collect();
                let mut guard: Vec<String> = Vec::new();
                if !out_keys.is_empty() {
                    guard.push(format!("EXISTS (SELECT 1 {})", join(&out_keys)));
                }
                if !in_keys.is_empty() {
                    guard.push(format!(
                        "(SELECT pg_catalog.count(*) {}) <> {}",
                        join(&in_keys),
                        in_keys.len()
                    ));
                }
                let guard = if guard.is_empty() {
                    "false".to_string()
                } else {
                    guard.join(" OR ")
                };
                // The learner is the parent's: a key it returns (equal to ours under its own
                // collation or operator, yet megabytes long) is read no longer than the longest
                // key asked about, plus one character, so it still differs from each of ours.
                let cap = upd.iter().map(|k| k.len()).max().unwrap_or(0) + 1;
                membership.push(MembershipCheck {
                    guard,
                    sql: format!(
                        "SELECT pg_catalog.jsonb_build_object({})::text FROM {} t \
                          JOIN pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k ON ({t_list}) = ({k_list})",
                        pk.iter().map(|c| format!("{}, pg_catalog.left(t.{}::pg_catalog.text, {cap})", literal(c), quote_ident(c))).collect::<Vec<_>>().join(", "),
                        table.ident,
                        table.ident,
                        literal(&format!("[{}]", upd.iter().cloned().collect::<Vec<_>>().join(",")))
                    ) + &format!(" LIMIT {}", upd.len() + 1),
                    table: table.ident.clone(),
                    pk: pk.clone(),
                    // Only asked about updated keys.
                    in_now: upd.intersection(&in_now).cloned().collect(),
                    updated: upd,
                });
            }
        }
        if reference {
            stmts.push(format!(
                "DELETE FROM {} t WHERE ({t_list}) NOT IN (SELECT {k_list} FROM pg_catalog.jsonb_populate_recordset(NULL::{}, {rows_lit}::pg_catalog.jsonb) k)",
                table.ident, table.ident
            ));
        } else if keys.is_some() {
            // Delete only the touched keys that are out of scope now. A row still in scope is
            // upserted in place: deleting and re-inserting it would fire the learner's ON DELETE
            // CASCADE / SET NULL on rows this batch does not send again.
            let gone: Vec<String> = touched[&table.oid]
                .iter()
                .filter(|k| !in_now.contains(*k))
                .cloned()
                .collect();
            if !gone.is_empty() {
                stmts.push(format!(
                    "DELETE FROM {} t USING pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k WHERE ({t_list}) = ({k_list})",
                    table.ident,
                    table.ident,
                    literal(&format!("[{}]", gone.join(",")))
                ));
            }
        }
        if !in_now.is_empty() {
            let cols = table.columns.join(", ");
            let set: Vec<String> = table
                .columns
                .iter()
                .filter(|c| !pk.iter().any(|p| quote_ident(p) == **c || p == *c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            let action = if set.is_empty() {
                "NOTHING".to_string()
            } else {
                format!("UPDATE SET {}", set.join(", "))
            };
            let (select, source) = insert_source(table, &rows_lit);
            stmts.push(format!(
                "INSERT INTO {} ({cols}) OVERRIDING SYSTEM VALUE SELECT {select} FROM {source} \
                 ON CONFLICT ({pk_list}) DO {action}",
                table.ident
            ));
        }
        if !reference && reconcile.contains(&table.oid) {
            // Everything of this table the family holds at S, by key: what else the learner
            // has of it goes. (Only the family's own keys are named.)
            let own = select_kept(
                plans,
                &format!("SELECT {key_agg} FROM ({}) s", table.select_sql),
                &[PgBuiltInOids::TEXTOID],
                &[t.parent.as_str().into()],
            );
            let own = match own {
                Ok(mut v) => v.pop().flatten().unwrap_or_else(|| "[]".into()),
                Err(e) => {
                    return Step::Done(Outcome::Broken {
                        error: format!("reading {}: {e}", table.ident),
                        changes: n,
                    })
                }
            };
            stmts.push(format!(
                "DELETE FROM {} t WHERE ({t_list}) NOT IN (SELECT {k_list} FROM pg_catalog.jsonb_populate_recordset(NULL::{}, {}::pg_catalog.jsonb) k)",
                table.ident,
                table.ident,
                literal(&own)
            ));
        }
    }
    Step::Send(Batch {
        stmts,
        membership,
        n,
    })
}

/// The scoped tables (not reference ones) at `rel` or owned through it: those whose ownership
/// path passes through `rel` (a scoped table or an undeclared path table).
fn at_or_below(sc: &Scope, rel: u32) -> Vec<u32> {
    let up_of = |oid: u32| match (sc.table(oid), sc.path_table(oid)) {
        (Some(t), _) => t.up.as_ref(),
        (None, Some(p)) => p.up.as_ref(),
        (None, None) => None,
    };
    sc.tables
        .iter()
        .filter(|t| !matches!(t.role, Role::Reference(_)))
        .filter(|t| {
            let mut at = t.oid;
            for _ in 0..=poco_core::scope::MAX_PATH_LEN {
                if at == rel {
                    return true;
                }
                match up_of(at) {
                    Some(h) => at = h.parent,
                    None => return false,
                }
            }
            false
        })
        .map(|t| t.oid)
        .collect()
}

/// Whether a key (JSON text, `key_of`) has every column: one read from an image that could
/// not be read has NULLs, and matches no row.
fn key_is_whole(k: &str) -> bool {
    match serde_json::from_str::<Value>(k) {
        Ok(Value::Object(m)) => !m.is_empty() && m.values().all(|v| !v.is_null()),
        _ => false,
    }
}

/// What a pass does for one target: an outcome already known, or a batch to send.
pub(super) enum Step {
    Done(Outcome),
    Send(Batch),
}

pub(super) struct Batch {
    pub(super) stmts: Vec<String>,
    pub(super) membership: Vec<MembershipCheck>,
    pub(super) n: i64,
}

/// The key of a row (or row image) as canonical JSON text: the primary key columns only.
pub(super) fn key_of(pk: &[String], row: &Value) -> String {
    key_value(pk, row).to_string()
}

/// The primary key columns of a row image.
pub(super) fn key_value(pk: &[String], row: &Value) -> Value {
    Value::Object(
        pk.iter()
            .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Value::Null)))
            .collect(),
    )
}

/// Updated rows of one table: which of them the learner holds (`sql`, run there) against
/// which are in the parent's scope now.
pub(super) struct MembershipCheck {
    pub(super) table: String,
    pub(super) pk: Vec<String>,
    pub(super) sql: String,
    /// The same check as a condition for the learner itself (true: a row moved), for the one
    /// round trip path.
    pub(super) guard: String,
    pub(super) updated: BTreeSet<String>,
    pub(super) in_now: BTreeSet<String>,
}

/// A value's text output, NULL kept (format's %s calls the type's output function: no cast,
/// so no type owner's code).
pub(super) fn text_of(expr: &str) -> String {
    format!("CASE WHEN {expr} IS NULL THEN NULL ELSE pg_catalog.format('%s', {expr}) END")
}

/// A column's safe type (poco.type_profile) by name; text when unknown.
pub(super) fn safe_type<'a>(table: &'a poco_core::scope::ScopedTable, col: &str) -> &'a str {
    table
        .all_columns
        .iter()
        .find(|c| c.name == col)
        .map(|c| c.safe_type.as_str())
        .unwrap_or("pg_catalog.text")
}

/// A column whose values are `json` (through domains): sent as its text, not as a JSON value.
/// jsonb, which a batch is, refuses `\u0000` in a string and keeps neither the key order, the
/// white space nor the duplicate keys that json keeps; the learner reads the text back as json
/// (`insert_source`).
pub(super) fn json_text(c: &poco_core::scope::Column) -> bool {
    c.json && c.safe_type == "json"
}

/// What the learner's upsert of `table` selects its columns from, given the batch's rows as a
/// jsonb array literal: `jsonb_populate_recordset`, or, when the table has json columns (sent
/// as text, see `json_text`), each row's element beside it, to read those as text.
fn insert_source(table: &poco_core::scope::ScopedTable, rows_lit: &str) -> (String, String) {
    let json: Vec<&poco_core::scope::Column> = table
        .all_columns
        .iter()
        .filter(|c| !table.excluded_attnums.contains(&c.attnum) && json_text(c))
        .collect();
    let cols = table.columns.join(", ");
    if json.is_empty() {
        return (
            cols,
            format!(
                "pg_catalog.jsonb_populate_recordset(NULL::{}, {rows_lit}::pg_catalog.jsonb)",
                table.ident
            ),
        );
    }
    let select: Vec<String> = table
        .columns
        .iter()
        .map(|ident| match json.iter().find(|c| c.ident == *ident) {
            Some(c) => format!(
                "(poco_r.poco_r OPERATOR(pg_catalog.->>) {})::pg_catalog.json",
                literal(&c.name)
            ),
            None => format!("k.{ident}"),
        })
        .collect();
    (
        select.join(", "),
        format!(
            "pg_catalog.jsonb_array_elements({rows_lit}::pg_catalog.jsonb) poco_r(poco_r) \
             CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::{}, poco_r.poco_r) k",
            table.ident
        ),
    )
}

/// The JSON of a row `alias` of the table's scoped query, without anyone's code: to_jsonb when
/// every sent column is of a built-in type (it then consults no cast), otherwise each column
/// that is not as its text output (the learner reads text back through the type's input,
/// which jsonb_populate_recordset does for strings), in pieces of 50 columns
/// (jsonb_build_object takes at most 100 arguments).
pub(super) fn row_json(table: &poco_core::scope::ScopedTable, alias: &str) -> String {
    let sent: Vec<&poco_core::scope::Column> = table
        .all_columns
        .iter()
        .filter(|c| !table.excluded_attnums.contains(&c.attnum))
        .collect();
    if sent.iter().all(|c| c.plain && !json_text(c)) {
        return format!("pg_catalog.to_jsonb({alias})");
    }
    let parts: Vec<String> = sent
        .chunks(50)
        .map(|cols| {
            let pairs: Vec<String> = cols
                .iter()
                .map(|c| {
                    let v = format!("{alias}.{}", c.ident);
                    format!(
                        "{}, {}",
                        literal(&c.name),
                        if c.plain && !json_text(c) { v } else { text_of(&v) }
                    )
                })
                .collect();
            format!("pg_catalog.jsonb_build_object({})", pairs.join(", "))
        })
        .collect();
    if parts.is_empty() {
        "'{}'::pg_catalog.jsonb".into()
    } else {
        parts.join(" OPERATOR(pg_catalog.||) ")
    }
}
