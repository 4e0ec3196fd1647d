//! `poco_verify(target_id, repair)` (API §2, issue #24 point 8): drift is found, not assumed
//! away. Each scoped table is compared between the learner and the parent's scope on the
//! platform by its row count and an order-independent hash of its rows as the learner should
//! hold them (the columns that leave the platform, excluded ones left out): the sum of a
//! 60-bit prefix of each row's md5. Both sums are computed by the servers themselves, so
//! nothing is held here but two numbers per table, whatever the account's size.
//!
//! Rows are hashed as their composite text form: on the platform through poco.record_image
//! (fixed output settings, as the capture writes), on the learner in a session of our own
//! with the same settings. A continuous target is first brought to the caller's snapshot (as
//! poco_sync_wait does); a table that differs is compared once more, after catching up again,
//! so writes during the check give no false alarm (up to three times).

use pgrx::prelude::*;

#[pg_schema]
mod poco {
    use crate::errors::{raise, OrRaise};
    use crate::net::{self, JobError};
    use crate::{catalog, gucs, keys};
    use pgrx::prelude::*;
    use poco_core::scope::scope_err;
    use poco_core::{PocoError, SqlState};
    use serde_json::json;
    use std::time::Duration;

    /// How long a continuous target is waited for before each comparison.
    const CATCH_UP_S: f64 = 60.0;
    /// How many times a table that differs is compared again before it is reported.
    const RECHECKS: usize = 3;

    /// A table's rows as (count, hash) over `from`, whose row alias is `s`.
    fn digest_sql(from: &str, cols: &[String], image: &str) -> String {
        let row = cols
            .iter()
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "SELECT pg_catalog.count(*)::pg_catalog.int8, \
                    COALESCE(pg_catalog.sum(('x' OPERATOR(pg_catalog.||) pg_catalog.substr(pg_catalog.md5({}), 1, 15))\
                        ::pg_catalog.bit(60)::pg_catalog.int8), 0)::pg_catalog.text \
               FROM {from} s",
            image.replace("{row}", &format!("ROW({row})"))
        )
    }

    struct Table {
        ident: String,
        platform_sql: String,
        learner_sql: String,
    }

    fn cancelled() -> bool {
        unsafe { pg_sys::QueryCancelPending != 0 || pg_sys::ProcDiePending != 0 }
    }

    fn job_error(e: JobError) -> ! {
        raise(scope_err(
            SqlState::ConnectionFailure,
            format!("poco_verify: {}", e.describe()),
            "The learner must answer to be compared: poco_status shows the target's last error.",
        ))
    }

    fn wait_caught_up(target: i64) -> bool {
        let snap = Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text")
            .or_raise()
            .unwrap_or_default();
        crate::sync::poco::sync_wait(Some(target), Some(snap), Some(CATCH_UP_S))
    }

    fn platform_digest(t: &Table, parent: &str) -> (i64, String) {
        Spi::connect(|c| {
            let mut rows = c
                .select(&t.platform_sql, Some(1), &[parent.into()])
                .or_raise();
            let r = rows.next().expect("an aggregate returns a row");
            (
                r.get::<i64>(1).ok().flatten().unwrap_or(0),
                r.get::<String>(2).ok().flatten().unwrap_or_default(),
            )
        })
    }

    /// The learner's (count, hash) of a table; None when it does not have the table.
    fn learner_digest(
        rt: &tokio::runtime::Runtime,
        client: &tokio_postgres::Client,
        t: &Table,
        timeout: Duration,
    ) -> Option<(i64, String)> {
        let r = rt.block_on(net::step("comparing a table", timeout, &cancelled, async {
            match client.query_opt(t.learner_sql.as_str(), &[]).await {
                Ok(row) => Ok(row.map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))),
                // The table is not there (never pushed, or dropped on the learner).
                Err(e) if e.code().is_some_and(|c| c.code() == "42P01" || c.code() == "3F000") => {
                    Ok(None)
                }
                Err(e) => Err(JobError::learner("comparing a table", &e)),
            }
        }));
        match r {
            Ok(v) => v,
            Err(e) => job_error(e),
        }
    }

    #[allow(clippy::type_complexity)]
    #[pg_extern(volatile, parallel_unsafe)]
    fn verify(
        target_id: Option<i64>,
        repair: Option<bool>,
    ) -> TableIterator<
        'static,
        (
            name!(table_name, String),
            name!(platform_rows, i64),
            name!(learner_rows, Option<i64>),
            name!(equal, bool),
        ),
    > {
        let target = target_id.unwrap_or_else(|| raise(PocoError::NullArgument("target_id")));
        crate::authz::authorize_target(target);
        if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            raise(scope_err(
                SqlState::ObjectNotInPrerequisiteState,
                "poco_verify cannot see the target catch up inside a REPEATABLE READ or SERIALIZABLE transaction",
                "Call poco_verify in a READ COMMITTED transaction (the default).",
            ));
        }
        let row = catalog::load_target(target).or_raise();
        let continuous = Spi::get_one_with_args::<bool>(
            "SELECT continuous FROM poco.target WHERE id = $1",
            &[target.into()],
        )
        .or_raise()
        .unwrap_or(false);
        let key = keys::current().or_raise();
        let password = crate::targets::poco::open_credentials(target, &key).or_raise();
        let sc = crate::scope::require().or_raise();
        let tables: Vec<Table> = sc
            .tables
            .iter()
            .map(|t| Table {
                ident: t.ident.clone(),
                platform_sql: digest_sql(
                    &format!("({})", t.select_sql),
                    &t.columns,
                    "poco.record_image({row})",
                ),
                learner_sql: digest_sql(&t.ident, &t.columns, "{row}::pg_catalog.text"),
            })
            .collect();

        let mut caught_up = !continuous || wait_caught_up(target);
        let timeout = gucs::network_timeout();
        let rt = crate::process::io_runtime();
        let client = match rt.block_on(net::step(
            "connect",
            timeout * 2,
            &cancelled,
            net::connect(
                &row.spec,
                password.as_deref(),
                gucs::allow_private_targets(),
                gucs::ssl_root_cert_dir(),
                timeout,
                "poco_sync verify",
            ),
        )) {
            Ok(c) => c,
            Err(e) => job_error(e),
        };
        // The learner spells values as record_image does on the platform; it only reads.
        if let Err(e) = rt.block_on(net::step("setting up", timeout, &cancelled, async {
            client
                .batch_execute(
                    "SET search_path = pg_catalog; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
                     SET extra_float_digits = 1; SET bytea_output = 'hex'; SET TimeZone = 'UTC'; \
                     SET default_transaction_read_only = on",
                )
                .await
                .map_err(|e| JobError::learner("setting up", &e))
        })) {
            job_error(e);
        }
        // A table's hash can take a while on a large account; the wait is still bounded.
        let long = (timeout * 20).max(Duration::from_secs(60));
        let compare = |t: &Table| -> (i64, Option<i64>, bool) {
            let p = platform_digest(t, &row.parent_id);
            let l = learner_digest(&rt, &client, t, long);
            let equal = l.as_ref() == Some(&p);
            (p.0, l.map(|l| l.0), equal)
        };
        let mut results: Vec<(i64, Option<i64>, bool)> = tables.iter().map(compare).collect();
        // A table that differs is compared again after catching up again: a write during the
        // check is no drift. A few times, for a family that keeps writing.
        for _ in 0..RECHECKS {
            if results.iter().all(|r| r.2) {
                break;
            }
            caught_up = !continuous || wait_caught_up(target);
            for (i, t) in tables.iter().enumerate() {
                if !results[i].2 {
                    results[i] = compare(t);
                }
            }
        }
        drop(client);
        drop(rt);
        let differing: Vec<&str> = tables
            .iter()
            .zip(&results)
            .filter(|(_, r)| !r.2)
            .map(|(t, _)| t.ident.as_str())
            .collect();
        let repair = repair.unwrap_or(false) && !differing.is_empty();
        let message = if differing.is_empty() {
            format!(
                "poco_verify: target {target} equals its scope ({} tables)",
                tables.len()
            )
        } else {
            format!(
                "poco_verify: target {target} differs from its scope in {} of {} tables: {}{}",
                differing.len(),
                tables.len(),
                differing.join(", "),
                if repair {
                    "; a new snapshot is queued"
                } else {
                    ""
                }
            )
        };
        catalog::log_event(
            "verify",
            Some(&row.parent_id),
            Some(target),
            &message,
            json!({"tables": tables.len(), "differing": differing, "caught_up": caught_up, "repair": repair}),
        );
        if repair {
            let why = format!("poco_verify found differences in {}", differing.join(", "));
            if continuous {
                catalog::resnapshot(target, &why, 0).or_raise();
            } else {
                Spi::run_with_args(
                    "SELECT pg_catalog.poco_push($1::pg_catalog.text, $2)",
                    &[row.parent_id.as_str().into(), target.into()],
                )
                .or_raise();
            }
        }
        TableIterator::new(
            tables
                .into_iter()
                .zip(results)
                .map(|(t, (p, l, eq))| (t.ident, p, l, eq))
                .collect::<Vec<_>>(),
        )
    }
}
