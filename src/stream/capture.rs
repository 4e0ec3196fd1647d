//! Capture source: the change log (`poco.change`) read from the oldest position of a pass,
//! a chunk at a time, and cut down to the keys a batch needs.

use super::*;

/// (table, operation, old row, new row)
pub(super) type Change = (u32, String, Option<Value>, Option<Value>);

/// A change as a batch needs it once attributed: its table, operation (I, U, D, T) and the
/// primary key (as JSON text) of its old and new images. Kept small: a long backlog is held
/// as a list of these.
pub(super) struct Keyed {
    pub(super) txid: u64,
    pub(super) rel: u32,
    pub(super) op: u8,
    pub(super) old: Option<Box<str>>,
    pub(super) new: Option<Box<str>>,
}

/// The log as a pass needs it: the changes some target of the pass has not seen, whom each
/// concerns, and the targets (indexes) whose own share passed poco.sync_max_backlog.
pub(super) struct Loaded {
    pub(super) changes: Vec<Keyed>,
    pub(super) owners: Vec<Owners>,
    /// Each change's old image's first ownership key, as the key of the row it points at
    /// (table, key text): how attribution::resolve_through_log follows a gone ancestor.
    pub(super) ups: Vec<Option<(u32, Box<str>)>>,
    pub(super) too_many: BTreeSet<usize>,
}

/// Changes fetched and attributed at a time: what is held is then only their keys.
pub(super) const LOAD_CHUNK: i64 = 2_000;

/// load_attributed's query.
const LOAD_SQL: &str = "SELECT txid, rel, op::text, old, new FROM poco.change WHERE txid >= $1";

/// An image over this size (of a table other than the root) is read without its values over
/// IMAGE_VALUE_MAX: no key holds one (btree entries are at most ~2.7 kB), and the rows sent
/// are read at S anyway, so a 100 MB value is not copied into the attribution for nothing.
const IMAGE_BIG: usize = 1 << 20;
const IMAGE_VALUE_MAX: usize = 64 << 10;

/// How the images of one relation are read: the scoped table they belong to (a partition's
/// belong to its partitioned table) and the relation's own columns in order (name, json).
pub(super) struct RelImage {
    pub(super) scoped: u32,
    pub(super) columns: Vec<(String, bool)>,
}

/// RelImages by relation, kept with the compiled scope (a partition is looked up the first
/// time one of its changes comes by).
pub(super) type RelImages = std::cell::RefCell<HashMap<u32, Option<std::rc::Rc<RelImage>>>>;

fn rel_image(sc: &Scope, rels: &RelImages, rel: u32) -> Option<std::rc::Rc<RelImage>> {
    if let Some(known) = rels.borrow().get(&rel) {
        return known.clone();
    }
    let columns = sc
        .table(rel)
        .map(|t| &t.all_columns)
        .or_else(|| sc.path_table(rel).map(|p| &p.all_columns));
    let found = match columns {
        Some(cols) => Some(RelImage {
            scoped: rel,
            columns: cols.iter().map(|c| (c.name.clone(), c.json)).collect(),
        }),
        // A partition (at any depth) of a scoped partitioned table: its own column order.
        None => Spi::connect(|c| {
            c.select(
                "SELECT pg_catalog.pg_partition_root($1)::pg_catalog.oid, \
                        pg_catalog.array_agg(a.attname::text ORDER BY a.attnum), \
                        pg_catalog.array_agg((SELECT p.json FROM poco.type_profile(a.atttypid, a.atttypmod) p) ORDER BY a.attnum) \
                   FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                None,
                &[pg_sys::Oid::from(rel).into()],
            )
            .ok()
            .and_then(|mut rows| rows.next())
            .and_then(|r| {
                let root = u32::from(r.get::<pg_sys::Oid>(1).ok()??);
                let names = r.get::<Vec<String>>(2).ok()??;
                let json = r.get::<Vec<bool>>(3).ok()??;
                (root != rel && (sc.table(root).is_some() || sc.path_table(root).is_some())).then(|| RelImage {
                    scoped: root,
                    columns: names.into_iter().zip(json).collect(),
                })
            })
        }),
    }
    .map(std::rc::Rc::new);
    rels.borrow_mut().insert(rel, found.clone());
    found
}

/// A change's row image (record text) as the JSON object attribution reads.
fn image(img: &RelImage, root: u32, text: Option<String>) -> Option<Value> {
    let text = text?;
    let max = if img.scoped != root && text.len() > IMAGE_BIG {
        IMAGE_VALUE_MAX
    } else {
        usize::MAX
    };
    match poco_core::record::image_json(&img.columns, &text, max) {
        Ok(v) => Some(v),
        Err(e) => {
            debug1!("poco_sync stream: an image that cannot be read: {e}");
            Some(Value::Null)
        }
    }
}

/// The changes of transactions visible in S (the current snapshot) that some of `positions`
/// has not seen, and whom each concerns among `parents`. Read through a cursor a chunk at a
/// time: each chunk is attributed with its whole images, which are then cut down to their
/// primary keys (all a batch needs of them), so memory follows the number of changes, not
/// their size. A target whose share passes `max` (poco.sync_max_backlog; 0: no limit) is
/// given up (it is re-snapshotted) and what only it needed is dropped, so what is held stays
/// under `max` changes.
pub(super) fn load_attributed(
    plans: &mut Plans,
    sc: &Scope,
    rels: &RelImages,
    pks: &HashMap<u32, Vec<String>>,
    positions: &[&Snap],
    parents: &[String],
    max: i64,
) -> Result<Loaded, String> {
    let mut out = Loaded {
        changes: Vec::new(),
        owners: Vec::new(),
        ups: Vec::new(),
        too_many: BTreeSet::new(),
    };
    let mut counts: Vec<i64> = vec![0; positions.len()];
    let from = positions.iter().map(|p| p.xmin).min().unwrap_or(0);
    // Attribution's own allocations (argument datums) are freed after each chunk.
    let mut cx = pgrx::PgMemoryContexts::new("poco_sync attribution");
    Spi::connect(|c| {
        // Visible in S (this transaction's snapshot) by construction; from the oldest
        // position's xmin: everything below it had ended before every position was taken.
        let mut cursor = c
            .try_open_cursor(LOAD_SQL, &[(from as i64).into()])
            .map_err(|e| e.to_string())?;
        loop {
            let too_many = &out.too_many;
            let unseen_by_some = |txid: u64| {
                positions
                    .iter()
                    .enumerate()
                    .any(|(i, p)| !too_many.contains(&i) && !p.visible(txid))
            };
            // Converting the images to JSON allocates in the current context: cx, too.
            let fetched = unsafe {
                cx.switch_to(|_| {
                    let rows = cursor.fetch(LOAD_CHUNK as _)?;
                    let table = pg_sys::SPI_tuptable;
                    let mut n = 0usize;
                    let mut chunk: Vec<(u64, u32, String, Option<String>, Option<String>)> =
                        Vec::new();
                    for r in rows {
                        n += 1;
                        let txid = r.get::<i64>(1).ok().flatten().unwrap_or(0) as u64;
                        if !unseen_by_some(txid) {
                            continue; // every target of the pass has it
                        }
                        chunk.push((
                            txid,
                            r.get::<pg_sys::Oid>(2)
                                .ok()
                                .flatten()
                                .map(u32::from)
                                .unwrap_or(0),
                            r.get::<String>(3).ok().flatten().unwrap_or_default(),
                            r.get::<String>(4).ok().flatten(),
                            r.get::<String>(5).ok().flatten(),
                        ));
                    }
                    Ok::<_, pgrx::spi::SpiError>((n, chunk, table))
                })
            };
            let (n, chunk, table) = fetched.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok::<(), String>(());
            }
            // Each image read by its own relation's columns, for the scoped table it belongs
            // to; a relation that belongs to none (a partition detached since) is dropped.
            let (txids, chunk): (Vec<u64>, Vec<Change>) = chunk
                .into_iter()
                .filter_map(|(txid, rel, op, old, new)| {
                    let img = rel_image(sc, rels, rel)?;
                    Some((
                        txid,
                        (
                            img.scoped,
                            op,
                            image(&img, sc.root, old),
                            image(&img, sc.root, new),
                        ),
                    ))
                })
                .unzip();
            let mut chunk = chunk;
            canonical_keys(sc, pks, &mut chunk);
            let chunk_owners =
                unsafe { cx.switch_to(|_| attribute_isolated(plans, sc, &chunk, parents)) };
            unsafe {
                cx.reset();
                if !table.is_null() {
                    pg_sys::SPI_freetuptable(table);
                }
            }
            for (txid, (rel, op, old, new)) in txids.into_iter().zip(chunk) {
                for (i, p) in positions.iter().enumerate() {
                    if !p.visible(txid) {
                        counts[i] += 1;
                    }
                }
                let pk: &[String] = pks.get(&rel).map(|v| v.as_slice()).unwrap_or(&[]);
                out.ups
                    .push(old.as_ref().and_then(|img| up_key(sc, pks, rel, img)));
                let cut = |img: Option<Value>| img.map(|i| key_of(pk, &i).into_boxed_str());
                out.changes.push(Keyed {
                    txid,
                    rel,
                    op: op.as_bytes().first().copied().unwrap_or(b'?'),
                    old: cut(old),
                    new: cut(new),
                });
            }
            out.owners.extend(chunk_owners);
            if crate::failpoint::fires("stream_key_loading") {
                return Err(
                    "failpoint stream_key_loading: the pass failed while loading the changes' keys"
                        .into(),
                );
            }
            if max > 0 && out.changes.len() as i64 > max {
                // Give up the targets past the limit and drop what only they needed.
                for (i, n) in counts.iter().enumerate() {
                    if *n > max {
                        out.too_many.insert(i);
                    }
                }
                let too_many = &out.too_many;
                let keep: Vec<bool> = out
                    .changes
                    .iter()
                    .map(|c| {
                        positions
                            .iter()
                            .enumerate()
                            .any(|(i, p)| !too_many.contains(&i) && !p.visible(c.txid))
                    })
                    .collect();
                let mut k = keep.iter();
                out.changes.retain(|_| *k.next().expect("same length"));
                let mut k = keep.iter();
                out.owners.retain(|_| *k.next().expect("same length"));
                let mut k = keep.iter();
                out.ups.retain(|_| *k.next().expect("same length"));
                if out.too_many.len() == positions.len() {
                    return Ok(()); // nobody left to read for
                }
            }
        }
    })?;
    resolve_through_log(&out.changes, &mut out.owners, &out.ups);
    Ok(out)
}

/// `attribute`, in a subtransaction: an error raised for one change (an image past jsonb's
/// limits, say) costs that change, not the pass of every family. The chunk is then attributed
/// change by change; a change that still fails is told to nobody (Side::Failed): each family
/// of the pass reads its keys through its own scope at S, and reconciles the table and what
/// is owned through it from its own keys (batch.rs), so no key is named to a family that does
/// not hold it.
fn attribute_isolated(
    plans: &mut Plans,
    sc: &Scope,
    chunk: &[Change],
    parents: &[String],
) -> Vec<Owners> {
    if let Ok(owners) = crate::process::in_subtransaction(|| attribute(plans, sc, chunk, parents)) {
        return owners;
    }
    chunk
        .iter()
        .map(|c| {
            let one = std::slice::from_ref(c);
            match crate::process::in_subtransaction(|| attribute(plans, sc, one, parents)) {
                Ok(mut o) if o.len() == 1 => o.pop().expect("one"),
                Ok(_) => Owners::Rows { old: Side::Failed, new: Side::Failed },
                Err(e) => {
                    let name = sc
                        .table(c.0)
                        .map(|x| x.ident.as_str())
                        .or_else(|| sc.path_table(c.0).map(|x| x.ident.as_str()))
                        .unwrap_or("?");
                    log!(
                        "poco_sync stream: a change of {name} could not be attributed; each family of the pass reads its rows through its own scope instead: {}",
                        e.describe()
                    );
                    Owners::Rows { old: Side::Failed, new: Side::Failed }
                }
            }
        })
        .collect()
}

/// The key of the row an old image's ownership path starts at, when that key is the parent's
/// primary key (as the parent's own images spell it): (parent table, key text).
fn up_key(
    sc: &Scope,
    pks: &HashMap<u32, Vec<String>>,
    rel: u32,
    img: &Value,
) -> Option<(u32, Box<str>)> {
    let hop = match sc.table(rel) {
        Some(t) => t.up.as_ref()?,
        None => sc.path_table(rel)?.up.as_ref()?,
    };
    let ppk = pks.get(&hop.parent)?;
    if ppk.len() != hop.parent_cols.len() || !ppk.iter().all(|c| hop.parent_cols.contains(c)) {
        return None;
    }
    let obj: serde_json::Map<String, Value> = hop
        .parent_cols
        .iter()
        .zip(&hop.child_cols)
        .map(|(p, c)| (p.clone(), img.get(c).cloned().unwrap_or(Value::Null)))
        .collect();
    Some((
        hop.parent,
        key_of(ppk, &Value::Object(obj)).into_boxed_str(),
    ))
}

/// Whether a type's text output depends on session settings (DateStyle, TimeZone,
/// IntervalStyle, extra_float_digits, lc_monetary, bytea_output): an image written in the
/// writer's session may then spell a key otherwise than the stream's session does.
fn session_dependent(safe_type: &str) -> bool {
    [
        "time",
        "date",
        "interval",
        "real",
        "double precision",
        "money",
        "bytea",
    ]
    .iter()
    .any(|w| safe_type.contains(w))
}

/// Spell the primary keys of the chunk's images as this session does (read through the key
/// types' input functions and written again), for tables whose key spelling depends on
/// session settings: a batch matches keys as text.
fn canonical_keys(sc: &Scope, pks: &HashMap<u32, Vec<String>>, chunk: &mut [Change]) {
    let mut by_table: BTreeMap<u32, Vec<(usize, bool)>> = BTreeMap::new();
    for (i, (rel, _, old, new)) in chunk.iter().enumerate() {
        for (img, is_old) in [(old, true), (new, false)] {
            if img.as_ref().is_some_and(|v| v.is_object()) {
                by_table.entry(*rel).or_default().push((i, is_old));
            }
        }
    }
    for (rel, at) in by_table {
        let (Some(table), Some(pk)) = (sc.table(rel), pks.get(&rel)) else {
            continue;
        };
        if !pk.iter().any(|c| session_dependent(safe_type(table, c))) {
            continue;
        }
        let keys: Vec<Value> = at
            .iter()
            .map(|(i, is_old)| {
                let c = &chunk[*i];
                key_value(
                    pk,
                    if *is_old { c.2.as_ref() } else { c.3.as_ref() }.unwrap(),
                )
            })
            .collect();
        let cols: Vec<String> = pk
            .iter()
            .map(|c| format!("{} {}", quote_ident(c), safe_type(table, c)))
            .collect();
        let out: Vec<String> = pk
            .iter()
            .map(|c| {
                format!(
                    "{}, {}",
                    literal(c),
                    text_of(&format!("k.{}", quote_ident(c)))
                )
            })
            .collect();
        let sql = format!(
            "SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object({}) ORDER BY k.poco_n)::text \
               FROM ROWS FROM (pg_catalog.jsonb_to_recordset($1::pg_catalog.jsonb) AS ({})) WITH ORDINALITY \
                    AS k({}, poco_n)",
            out.join(", "),
            cols.join(", "),
            pk.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
        );
        // In a subtransaction: a key that does not read back (or keys past jsonb's limits)
        // leaves the keys as written, and never fails the pass of every family.
        let canon = crate::process::in_subtransaction(|| {
            Spi::get_one_with_args::<String>(&sql, &[pgrx::JsonB(Value::Array(keys)).into()])
        })
        .ok()
        .and_then(|r| r.ok().flatten())
        .and_then(|s| serde_json::from_str::<Vec<Value>>(&s).ok());
        let Some(canon) = canon.filter(|c| c.len() == at.len()) else {
            continue; // kept as written: a key that does not parse cannot be matched anyway
        };
        for ((i, is_old), k) in at.into_iter().zip(canon) {
            let c = &mut chunk[i];
            if let Some(Value::Object(img)) = if is_old { c.2.as_mut() } else { c.3.as_mut() } {
                if let Value::Object(k) = k {
                    img.extend(k);
                }
            }
        }
    }
}
