//! The SPI boundary: every query against poco's catalog tables lives here and returns owned
//! Rust values. Nothing outside this module builds SQL against the catalog.

use crate::errors::OrRaise;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;
use poco_core::target::TargetSpec;
use poco_core::{PocoError, Result};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct TargetRow {
    pub id: i64,
    pub parent_id: String,
    pub spec: TargetSpec,
    pub secret: Option<Vec<u8>>,
}

const TARGET_COLUMNS: &str =
    "id, parent_id, host, port, dbname, username, sslmode, params, secret";

fn row_to_target(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<TargetRow> {
    let get_s = |i: usize| -> String { row.get::<String>(i).ok().flatten().unwrap_or_default() };
    let params: BTreeMap<String, String> = row
        .get::<JsonB>(8)
        .ok()
        .flatten()
        .and_then(|j| serde_json::from_value(j.0).ok())
        .unwrap_or_default();
    let spec = TargetSpec::from_stored(
        &get_s(3),
        row.get::<i32>(4).ok().flatten().unwrap_or(0),
        &get_s(5),
        &get_s(6),
        &get_s(7),
        params,
    )?;
    Ok(TargetRow {
        id: row.get::<i64>(1).ok().flatten().unwrap_or(0),
        parent_id: get_s(2),
        spec,
        secret: row.get::<Vec<u8>>(9).ok().flatten(),
    })
}

fn select_targets(where_clause: &str, args: &[DatumWithOid]) -> Result<Vec<TargetRow>> {
    let q = format!("SELECT {TARGET_COLUMNS} FROM poco.target {where_clause} ORDER BY id");
    Spi::connect(|client| {
        let table = client.select(q.as_str(), None, args).or_raise();
        table.map(|row| row_to_target(&row)).collect()
    })
}

pub fn load_target(id: i64) -> Result<TargetRow> {
    select_targets("WHERE id = $1", &[id.into()])?
        .pop()
        .ok_or(PocoError::NoSuchTarget(id))
}

/// Lock and load every target (for key rotation).
pub fn all_targets_for_update() -> Result<Vec<TargetRow>> {
    Spi::run("LOCK TABLE poco.target IN SHARE ROW EXCLUSIVE MODE").or_raise();
    select_targets("", &[])
}

pub fn next_target_id() -> i64 {
    Spi::get_one::<i64>("SELECT nextval('poco.target_id_seq')").or_raise().expect("nextval")
}

/// The first column of the first row, or None when there is no row (Spi::get_one errors then).
fn first_value<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid]) -> Option<T> {
    Spi::connect_mut(|client| {
        let mut table = client.update(query, Some(1), args).or_raise();
        table.next().and_then(|row| row.get::<T>(1).ok().flatten())
    })
}

/// A target of this parent that already points at the same server, database and user.
pub fn find_same_destination(parent_id: &str, spec: &TargetSpec) -> Option<i64> {
    first_value::<i64>(
        "SELECT id FROM poco.target WHERE parent_id = $1 AND host = $2 AND port = $3 \
         AND dbname = $4 AND username = $5 ORDER BY id LIMIT 1 FOR UPDATE",
        &[
            parent_id.into(),
            spec.host.as_string().into(),
            (spec.port as i32).into(),
            spec.dbname.clone().into(),
            spec.user.clone().into(),
        ],
    )
}

pub struct NewTarget<'a> {
    pub id: i64,
    pub parent_id: &'a str,
    pub label: Option<&'a str>,
    pub spec: &'a TargetSpec,
    pub secret: Option<Vec<u8>>,
    pub key_id: String,
}

fn params_json(spec: &TargetSpec) -> JsonB {
    JsonB(serde_json::to_value(&spec.params).expect("params are strings"))
}

/// Write a target: a new row, or the existing row with this id (same destination stored
/// again: new credentials, options and label, same id, since the id is sealed into the AAD).
pub fn upsert_target(t: &NewTarget) {
    Spi::run_with_args(
        "INSERT INTO poco.target (id, parent_id, label, host, port, dbname, username, sslmode, \
         params, url_redacted, secret, key_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) \
         ON CONFLICT (id) DO UPDATE SET label = coalesce(EXCLUDED.label, poco.target.label), \
         sslmode = EXCLUDED.sslmode, params = EXCLUDED.params, url_redacted = EXCLUDED.url_redacted, \
         secret = EXCLUDED.secret, key_id = EXCLUDED.key_id, updated_at = now()",
        &[
            t.id.into(),
            t.parent_id.into(),
            t.label.into(),
            t.spec.host.as_string().into(),
            (t.spec.port as i32).into(),
            t.spec.dbname.clone().into(),
            t.spec.user.clone().into(),
            t.spec.sslmode.as_str().into(),
            params_json(t.spec).into(),
            t.spec.redacted_url().into(),
            t.secret.clone().into(),
            t.key_id.clone().into(),
        ],
    )
    .or_raise();
}

pub fn set_secret(id: i64, secret: Option<Vec<u8>>, key_id: &str) {
    Spi::run_with_args(
        "UPDATE poco.target SET secret = $2, key_id = $3, updated_at = now() WHERE id = $1",
        &[id.into(), secret.into(), key_id.into()],
    )
    .or_raise();
}

/// Delete a target; returns (parent id, redacted URL) of what was deleted.
pub fn delete_target(id: i64) -> Result<(String, String)> {
    Spi::connect_mut(|client| {
        let mut table = client
            .update(
                "DELETE FROM poco.target WHERE id = $1 RETURNING parent_id, url_redacted",
                None,
                &[id.into()],
            )
            .or_raise();
        let row = table.next().ok_or(PocoError::NoSuchTarget(id))?;
        let get = |i| row.get::<String>(i).ok().flatten().unwrap_or_default();
        Ok((get(1), get(2)))
    })
}

/// Append to the audit log `poco.events`.
pub fn log_event(
    kind: &str,
    parent_id: Option<&str>,
    target_id: Option<i64>,
    message: &str,
    detail: serde_json::Value,
) {
    Spi::run_with_args(
        "INSERT INTO poco.events (kind, parent_id, target_id, message, detail) VALUES ($1,$2,$3,$4,$5)",
        &[kind.into(), parent_id.into(), target_id.into(), message.into(), JsonB(detail).into()],
    )
    .or_raise();
}
