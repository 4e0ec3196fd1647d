//! Attribution: whom each captured change concerns, among the parents of a pass.

use super::*;

/// Whom one change concerns, among the parents of a group.
pub(super) enum Owners {
    /// These parents' scopes (indexes into the group's sorted parents) hold the row at S (as
    /// it is now, or as it was).
    Some(Vec<u32>),
    /// Every target: a reference row, TRUNCATE, or the owner could not be looked up.
    Everyone,
    /// Nobody can be named: the old image of a row whose chain is gone at S (deleted with its
    /// ancestors). It goes with every batch that is sent anyway: whoever held the row also
    /// gets its highest deleted ancestor's own change, whose parent is still there.
    Unknown,
}

impl Owners {
    /// The change is sent to this parent's learner (if its batch is sent at all).
    pub(super) fn goes_to(&self, parent: Option<u32>) -> bool {
        match self {
            Owners::Some(s) => parent.is_some_and(|p| s.contains(&p)),
            Owners::Everyone | Owners::Unknown => true,
        }
    }
    /// The change alone makes a batch for this parent.
    pub(super) fn concerns(&self, parent: Option<u32>) -> bool {
        match self {
            Owners::Some(s) => parent.is_some_and(|p| s.contains(&p)),
            Owners::Everyone => true,
            Owners::Unknown => false,
        }
    }
}

/// Whom each change concerns among `parents`: those whose scope, at S, holds the changed row
/// as it is now or as it was before (its old image). A row a learner holds and loses is
/// caught through its old image, or, when what moved is an ancestor, through the highest
/// changed ancestor's old image (above it nothing changed, so its chain at S is the one the
/// learner knew). Reference rows and TRUNCATE concern everyone.
pub(super) fn attribute(
    plans: &mut Plans,
    sc: &Scope,
    changes: &[Change],
    parents: &[String],
) -> Vec<Owners> {
    // The candidates as one text[] datum for the whole chunk (in the caller's memory context),
    // not one array per row image.
    let candidates: pgrx::datum::DatumWithOid = parents.to_vec().into();
    changes
        .iter()
        .map(|(rel, op, old, new)| {
            let Some(table) = sc.table(*rel) else {
                return Owners::Some(Vec::new());
            };
            if op == "T" || matches!(table.role, Role::Reference(_)) {
                return Owners::Everyone;
            }
            let mut found: Vec<u32> = Vec::new();
            let mut old_unknown = false;
            for (img, is_old) in [(old, true), (new, false)] {
                let Some(img) = img else { continue };
                let args = [
                    unsafe {
                        pgrx::datum::DatumWithOid::new_from_datum(
                            candidates.datum(),
                            candidates.oid(),
                        )
                    },
                    pgrx::JsonB(img.clone()).into(),
                ];
                match select_kept(
                    plans,
                    &table.owners_sql,
                    &[PgBuiltInOids::TEXTARRAYOID, PgBuiltInOids::JSONBOID],
                    &args,
                ) {
                    Ok(rows) => {
                        let before = found.len();
                        for p in rows.into_iter().flatten() {
                            if let Ok(i) = parents.binary_search(&p) {
                                if !found.contains(&(i as u32)) {
                                    found.push(i as u32);
                                }
                            }
                        }
                        if is_old && found.len() == before {
                            old_unknown = true;
                        }
                    }
                    Err(_) => return Owners::Everyone, // cannot tell: assume it concerns everyone
                }
            }
            if found.is_empty() && old_unknown {
                Owners::Unknown
            } else {
                Owners::Some(found)
            }
        })
        .collect()
}
