//! Per-parent authorization (issue #15, point 12). A role granted a parent with
//! `poco_grant_parent(role, parent_id)` may act for that parent's account only: every function
//! that takes a parent, a target or a job checks it, and the views show it its own rows only.
//! The role is the one in effect when the function is called (after SET ROLE; a SECURITY
//! DEFINER function does not change it), with what it inherits: an application that connects
//! as one role and does `SET ROLE parent_42` for each signed-in parent is held to that parent.
//! A role with no parent granted (directly or by inheritance), such as the application role
//! of `poco_grant_usage`, acts for every parent; superusers always do.

use crate::errors::raise;
use pgrx::prelude::*;
use poco_core::scope::scope_err;
use poco_core::SqlState;

/// The role the call is made as: the session's, or the one SET ROLE chose.
fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

fn caller_name() -> String {
    unsafe {
        let p = pg_sys::GetUserNameFromId(caller(), true);
        if p.is_null() {
            "?".into()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// The parents the calling role may act for; None: every parent.
pub fn restricted_to() -> Option<Vec<String>> {
    let r = caller();
    if unsafe { pg_sys::superuser_arg(r) } {
        return None;
    }
    let parents: Vec<String> = Spi::connect(|c| {
        c.select(
            "SELECT DISTINCT m.parent_id FROM poco.parent_role m \
              WHERE pg_catalog.pg_has_role($1, m.role::pg_catalog.oid, 'USAGE') ORDER BY 1",
            None,
            &[r.into()],
        )
        .map(|rows| {
            rows.filter_map(|row| row.get::<String>(1).ok().flatten())
                .collect()
        })
        .unwrap_or_default()
    });
    (!parents.is_empty()).then_some(parents)
}

fn refuse(what: String) -> ! {
    raise(scope_err(
        SqlState::InsufficientPrivilege,
        format!("role {} may not act for {what}", caller_name()),
        "This role acts for the parents granted to it with poco_grant_parent(role, parent_id) only.",
    ))
}

/// Raise 42501 unless the caller may act for this parent (canonical form).
pub fn authorize_parent(parent: &str) {
    if let Some(own) = restricted_to() {
        if !own.iter().any(|p| p == parent) {
            refuse(format!("parent {parent}"));
        }
    }
}

/// Raise 42501 unless the target belongs to a parent the caller may act for. To a restricted
/// role, a target of another parent and one that does not exist look the same.
pub fn authorize_target(target: i64) {
    authorize_row(
        "SELECT parent_id FROM poco.target WHERE id = $1",
        target,
        "target",
    )
}

/// The same for a job.
pub fn authorize_job(job: i64) {
    authorize_row("SELECT parent_id FROM poco.job WHERE id = $1", job, "job")
}

fn authorize_row(sql: &str, id: i64, what: &str) {
    if let Some(own) = restricted_to() {
        let parent = Spi::get_one_with_args::<String>(sql, &[id.into()])
            .ok()
            .flatten();
        if !parent.is_some_and(|p| own.contains(&p)) {
            refuse(format!("{what} {id}"));
        }
    }
}

#[pg_schema]
pub mod poco {
    use super::*;

    /// The parent id in canonical form, once the caller may act for it (42501 otherwise).
    #[pg_extern(volatile, parallel_unsafe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn authorized_parent(parent_id: &str) -> String {
        let p = crate::scope::canonical_parent(parent_id).unwrap_or_else(|e| raise(e));
        authorize_parent(&p);
        p
    }

    #[pg_extern(volatile, parallel_unsafe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn authorize_target(target_id: i64) {
        super::authorize_target(target_id)
    }

    /// Whether the caller may see rows of this parent (the views' filter). Rows of no parent
    /// (scope changes, say) are for roles that act for every parent.
    #[pg_extern(stable, parallel_safe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn may_see(parent_id: Option<&str>) -> bool {
        match restricted_to() {
            None => true,
            Some(own) => parent_id.is_some_and(|p| own.iter().any(|o| o == p)),
        }
    }
}
