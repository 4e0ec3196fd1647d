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
    pub(super) too_many: BTreeSet<usize>,
}

/// Changes fetched and attributed at a time: what is held is then only their keys.
pub(super) const LOAD_CHUNK: i64 = 2_000;

/// load_attributed's query, built once.
pub(super) static LOAD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT txid, rel, op::text, {}, {} FROM poco.change WHERE txid >= $1",
        key_image("old"),
        key_image("new")
    )
});

/// The SQL for a change image as load_attributed reads it (see there).
pub(super) fn key_image(col: &str) -> String {
    format!(
        "CASE WHEN {col} IS NULL OR rel = $2 OR pg_catalog.octet_length({col}::text) <= 1048576 THEN {col}::pg_catalog.jsonb \
              ELSE (SELECT pg_catalog.jsonb_object_agg(e.key, CASE WHEN pg_catalog.octet_length(e.value::text) > 65536 \
                                                               THEN 'null'::pg_catalog.json ELSE e.value END) \
                      FROM pg_catalog.json_each({col}) e) END"
    )
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
    pks: &HashMap<u32, Vec<String>>,
    positions: &[&Snap],
    parents: &[String],
    max: i64,
) -> Result<Loaded, String> {
    let mut out = Loaded {
        changes: Vec::new(),
        owners: Vec::new(),
        too_many: BTreeSet::new(),
    };
    let mut counts: Vec<i64> = vec![0; positions.len()];
    let from = positions.iter().map(|p| p.xmin).min().unwrap_or(0);
    // Attribution's own allocations (argument datums) are freed after each chunk.
    let mut cx = pgrx::PgMemoryContexts::new("poco_sync attribution");
    Spi::connect(|c| {
        // Visible in S (this transaction's snapshot) by construction; from the oldest
        // position's xmin: everything below it had ended before every position was taken.
        // Attribution and keys need the key and foreign key columns of an image, and the
        // root's predicate columns: an image over 1 MB of any other table comes without its
        // values over 64 kB (no key holds one: btree entries are at most ~2.7 kB), so a 100 MB
        // value is not parsed and copied here for nothing. The rows sent are read at S anyway.
        let mut cursor = c
            .try_open_cursor(
                LOAD_SQL.as_str(),
                &[
                    (from as i64).into(),
                    pgrx::pg_sys::Oid::from(sc.root).into(),
                ],
            )
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
                    let mut chunk: Vec<(u64, Change)> = Vec::new();
                    for r in rows {
                        n += 1;
                        let txid = r.get::<i64>(1).ok().flatten().unwrap_or(0) as u64;
                        if !unseen_by_some(txid) {
                            continue; // every target of the pass has it
                        }
                        chunk.push((
                            txid,
                            (
                                r.get::<pg_sys::Oid>(2)
                                    .ok()
                                    .flatten()
                                    .map(u32::from)
                                    .unwrap_or(0),
                                r.get::<String>(3).ok().flatten().unwrap_or_default(),
                                r.get::<pgrx::JsonB>(4).ok().flatten().map(|j| j.0),
                                r.get::<pgrx::JsonB>(5).ok().flatten().map(|j| j.0),
                            ),
                        ));
                    }
                    Ok::<_, pgrx::spi::SpiError>((n, chunk, table))
                })
            };
            let (n, chunk, table) = fetched.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok::<(), String>(());
            }
            let (txids, chunk): (Vec<u64>, Vec<Change>) = chunk.into_iter().unzip();
            let chunk_owners = unsafe { cx.switch_to(|_| attribute(plans, sc, &chunk, parents)) };
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
                if out.too_many.len() == positions.len() {
                    return Ok(()); // nobody left to read for
                }
            }
        }
    })?;
    Ok(out)
}
