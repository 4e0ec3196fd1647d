//! Attribution: whom each captured change concerns, among the parents of a pass.
//!
//! A batch may name a key only to a learner that holds the row or is to hold it: its family
//! owned the row before (the old image) or owns it now (the new image). So each image is
//! attributed on its own side, and a side whose owner cannot be told from the tables at S (an
//! ancestor was deleted in the same range) is told from the log (that ancestor's own change),
//! or else the batch reconciles the table from the family's own keys instead of naming it.

use super::*;
use poco_core::scope::Hop;

/// Whom one image of a change belongs to.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Side {
    /// No image on this side (an insert has no old one, a delete no new one).
    Absent,
    /// These parents' scopes (indexes into the pass's sorted parents) hold the image at S:
    /// exact, possibly none (another family's, or nobody's).
    Known(Vec<u32>),
    /// Its ownership path reaches no root row at S (an ancestor is gone): resolved through
    /// the log once the pass's changes are loaded (`resolve_through_log`).
    Unreached,
    /// The lookup failed (an image that cannot be read, a query error).
    Failed,
}

impl Side {
    fn has(&self, p: Option<u32>) -> bool {
        matches!(self, Side::Known(s) if p.is_some_and(|p| s.contains(&p)))
    }
    fn uncertain(&self) -> bool {
        matches!(self, Side::Unreached | Side::Failed)
    }
}

/// Whom one change concerns, among the parents of a group.
pub(super) enum Owners {
    /// Every target re-checks: a reference row, or TRUNCATE. No key of it is ever sent.
    Everyone,
    /// A row of the root or an owned table, image by image.
    Rows { old: Side, new: Side },
}

impl Owners {
    /// The change makes (or goes with) a batch for this parent: its family owned or owns the
    /// row, or whom it belonged to is not known (then every learner reconciles the table).
    pub(super) fn concerns(&self, parent: Option<u32>) -> bool {
        match self {
            Owners::Everyone => true,
            Owners::Rows { old, new } => {
                old.has(parent) || new.has(parent) || old.uncertain() || new.uncertain()
            }
        }
    }
    /// Whether this parent's learner may be sent the old key (it held the row), the new key
    /// (it is to hold it), and whether it must reconcile the table instead of being told.
    pub(super) fn for_parent(&self, parent: Option<u32>) -> (bool, bool, bool) {
        match self {
            Owners::Everyone => (true, true, false),
            Owners::Rows { old, new } => (
                old.has(parent),
                new.has(parent),
                old.uncertain() || new.uncertain(),
            ),
        }
    }
    /// Whether an image's lookup failed: whom the change concerns is not known on that side,
    /// so no family is told its keys, and each reads them through its own scope instead.
    pub(super) fn failed(&self) -> bool {
        matches!(self, Owners::Rows { old, new } if *old == Side::Failed || *new == Side::Failed)
    }
    /// An update whose row changed family (the parents before and after differ): what it owns
    /// moved with it. The parents concerned on either side.
    pub(super) fn moved(&self) -> Option<BTreeSet<u32>> {
        match self {
            Owners::Rows {
                old: Side::Known(a),
                new: Side::Known(b),
            } => {
                let (a, b): (BTreeSet<u32>, BTreeSet<u32>) =
                    (a.iter().copied().collect(), b.iter().copied().collect());
                (a != b).then(|| a.union(&b).copied().collect())
            }
            _ => None,
        }
    }
}

/// Whom each change concerns among `parents`: for each image, the parents whose scope, at S,
/// holds it. Reference rows and TRUNCATE concern everyone.
pub(super) fn attribute(
    plans: &mut Plans,
    sc: &Scope,
    changes: &[Change],
    parents: &[String],
) -> Vec<Owners> {
    // The candidates as one text[] datum for the whole chunk (in the caller's memory context),
    // not one array per row image.
    let candidates: pgrx::datum::DatumWithOid = parents.to_vec().into();
    // One image through the owners queries of its table (one per way up to the root: two
    // only for an undeclared table two ownership paths leave by different keys).
    let mut side = |queries: &[&str], up: Option<&Hop>, img: &Option<Value>, is_old: bool| {
        let Some(img) = img else { return Side::Absent };
        if !img.is_object() {
            return Side::Failed;
        }
        let mut found: Vec<u32> = Vec::new();
        let mut reached = false;
        for sql in queries {
            if crate::failpoint::armed("stream_attribution") {
                pgrx::error!("failpoint stream_attribution: an owner lookup failed");
            }
            let args = [
                unsafe {
                    pgrx::datum::DatumWithOid::new_from_datum(candidates.datum(), candidates.oid())
                },
                pgrx::JsonB(img.clone()).into(),
            ];
            let Ok(rows) = select_kept(
                plans,
                sql,
                &[PgBuiltInOids::TEXTARRAYOID, PgBuiltInOids::JSONBOID],
                &args,
            ) else {
                return Side::Failed;
            };
            let mut this_reached = true;
            for p in rows {
                match p {
                    None => this_reached = false,
                    Some(p) => {
                        if let Ok(i) = parents.binary_search(&p) {
                            if !found.contains(&(i as u32)) {
                                found.push(i as u32);
                            }
                        }
                    }
                }
            }
            reached |= this_reached;
        }
        // The new image is what S holds: reaching no root row, it is nobody's. The old one
        // reaching none is nobody's only when its own key says "no reference" (a NULL); else
        // an ancestor is gone and the log must tell.
        let null_up = up.is_some_and(|h| {
            h.child_cols
                .iter()
                .any(|c| img.get(c).is_none_or(Value::is_null))
        });
        if reached || !is_old || null_up {
            Side::Known(found)
        } else {
            Side::Unreached
        }
    };
    changes
        .iter()
        .map(|(rel, op, old, new)| {
            if op == "T" {
                return Owners::Everyone;
            }
            // A row of an undeclared path table is never sent; its images tell whether what
            // it leads to changed family (moved) and whom its old self belonged to.
            let (queries, up): (Vec<&str>, Option<&Hop>) =
                match (sc.table(*rel), sc.path_table(*rel)) {
                    (Some(t), _) if matches!(t.role, Role::Reference(_)) => {
                        return Owners::Everyone
                    }
                    (Some(t), _) => (vec![t.owners_sql.as_str()], t.up.as_ref()),
                    (None, Some(p)) => (
                        p.owners_sql.iter().map(String::as_str).collect(),
                        p.up.as_ref(),
                    ),
                    (None, None) => {
                        return Owners::Rows {
                            old: Side::Known(Vec::new()),
                            new: Side::Known(Vec::new()),
                        }
                    }
                };
            Owners::Rows {
                old: side(&queries, up, old, true),
                new: side(&queries, up, new, false),
            }
        })
        .collect()
}

/// The old owners of rows whose path reached no root row at S, told from the log: the row
/// pointed (its ownership path's first key, in its old image) at a row whose own change is in
/// this pass's log, deleted or updated; that row's old owners are this one's. Followed up the
/// path as far as the log goes. What stays unreached is reconciled (`Owners::for_parent`).
/// `ups[i]`: change i's old image's first path key as the parent's key text (capture.rs).
pub(super) fn resolve_through_log(
    changes: &[Keyed],
    owners: &mut [Owners],
    ups: &[Option<(u32, Box<str>)>],
) {
    if !owners.iter().any(|o| {
        matches!(
            o,
            Owners::Rows {
                old: Side::Unreached,
                ..
            }
        )
    }) {
        return;
    }
    // Old images by (table, key).
    let mut by_key: HashMap<(u32, &str), Vec<usize>> = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        if let Some(k) = &c.old {
            by_key.entry((c.rel, k)).or_default().push(i);
        }
    }
    fn resolve(
        i: usize,
        depth: usize,
        owners: &[Owners],
        ups: &[Option<(u32, Box<str>)>],
        by_key: &HashMap<(u32, &str), Vec<usize>>,
        memo: &mut HashMap<usize, Option<Vec<u32>>>,
    ) -> Option<Vec<u32>> {
        if let Some(m) = memo.get(&i) {
            return m.clone();
        }
        let out = match &owners[i] {
            Owners::Rows {
                old: Side::Known(s),
                ..
            } => Some(s.clone()),
            Owners::Rows {
                old: Side::Unreached,
                ..
            } if depth < poco_core::scope::MAX_PATH_LEN => {
                let (parent, key) = ups[i].as_ref()?;
                let found = by_key.get(&(*parent, key.as_ref()))?;
                let mut all: BTreeSet<u32> = BTreeSet::new();
                for &j in found {
                    all.extend(resolve(j, depth + 1, owners, ups, by_key, memo)?);
                }
                Some(all.into_iter().collect())
            }
            _ => None,
        };
        memo.insert(i, out.clone());
        out
    }
    let mut memo = HashMap::new();
    let resolved: Vec<(usize, Vec<u32>)> = (0..owners.len())
        .filter(|i| {
            matches!(
                owners[*i],
                Owners::Rows {
                    old: Side::Unreached,
                    ..
                }
            )
        })
        .filter_map(|i| resolve(i, 0, owners, ups, &by_key, &mut memo).map(|s| (i, s)))
        .collect();
    for (i, s) in resolved {
        if let Owners::Rows { old, .. } = &mut owners[i] {
            *old = Side::Known(s);
        }
    }
}
