//! The SQL surface for learner targets (API §2): add, remove, check, rotate the key.
//! The public `poco_*` wrappers (sql/finalize.sql) take any parent id type and call these.

use pgrx::prelude::*;

#[pg_schema]
pub mod poco {
    use crate::catalog::{self, NewTarget};
    use crate::errors::{raise, OrRaise};
    use crate::{gucs, keys};
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use poco_core::crypto::{load_key_file, Key};
    use poco_core::target::{parse_json, parse_url, TargetSpec};
    use poco_core::{PocoError, Result};
    use serde_json::json;

    fn parse(url: Option<&str>, url_json: Option<JsonB>) -> Result<TargetSpec> {
        match (url, url_json) {
            (Some(u), _) => parse_url(u),
            (None, Some(j)) => parse_json(&j.0),
            (None, None) => Err(PocoError::NullArgument("url")),
        }
    }

    fn seal(key: &Key, id: i64, parent_id: &str, spec: &TargetSpec) -> Option<Vec<u8>> {
        spec.password
            .as_ref()
            .map(|pw| key.encrypt(pw.expose().as_bytes(), &spec.associated_data(id, parent_id)))
    }

    /// Store (or update, for the same parent, server, database and user) a target.
    pub(crate) fn store_target(
        parent_id: &str,
        url: Option<&str>,
        url_json: Option<JsonB>,
        label: Option<&str>,
    ) -> Result<i64> {
        let spec = parse(url, url_json)?;
        spec.validate(gucs::allow_private_targets())?;
        spec.check_root_cert(gucs::ssl_root_cert_dir().as_deref())?;
        let parent = crate::scope::existing_parent(parent_id)?;
        crate::authz::authorize_parent(&parent);
        let parent_id = parent.as_str();
        let key = keys::current()?;
        let (id, existed) = match catalog::find_same_destination(parent_id, &spec) {
            Some(id) => (id, true),
            None => (catalog::next_target_id(), false),
        };
        let t = NewTarget {
            id,
            parent_id,
            label,
            spec: &spec,
            secret: seal(&key, id, parent_id, &spec),
            key_id: key.id_hex(),
        };
        catalog::upsert_target(&t);
        let url = spec.redacted_url();
        let (kind, what) = if existed {
            ("target_updated", "updated")
        } else {
            ("target_added", "added")
        };
        catalog::log_event(
            kind,
            Some(parent_id),
            Some(id),
            &format!("target {id} of parent {parent_id} {what}: {url}"),
            json!({"url": url, "label": label}),
        );
        Ok(id)
    }

    /// Internal: called by the public `poco_add_target` overloads.
    #[pg_extern(volatile, parallel_unsafe)]
    fn add_target(
        parent_id: Option<&str>,
        url: Option<&str>,
        url_json: Option<JsonB>,
        label: Option<&str>,
    ) -> i64 {
        let parent_id = parent_id.unwrap_or_else(|| raise(PocoError::NullArgument("parent_id")));
        store_target(parent_id, url, url_json, label).or_raise()
    }

    /// Internal: called by `poco_remove_target`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn remove_target(target_id: Option<i64>) {
        let id = target_id.unwrap_or_else(|| raise(PocoError::NullArgument("target_id")));
        crate::authz::authorize_target(id);
        let (parent, url) = catalog::delete_target(id).or_raise();
        // It may have been the last one syncing: then the capture goes too.
        Spi::run("SELECT poco.refresh_capture()").or_raise();
        catalog::log_event(
            "target_removed",
            Some(&parent),
            Some(id),
            &format!("target {id} of parent {parent} removed: {url}"),
            json!({"url": url}),
        );
    }

    /// Decrypt a target's stored credentials with the current key, without connecting.
    /// Returns the key id that opened them ('no password' when none is stored).
    pub(crate) fn open_credentials(id: i64, key: &Key) -> Result<Option<String>> {
        let t = catalog::load_target(id)?;
        match &t.secret {
            None => Ok(None),
            Some(blob) => {
                let aad = t.spec.associated_data(t.id, &t.parent_id);
                let pw = key.decrypt(t.id, blob, &aad)?;
                String::from_utf8(pw)
                    .map(Some)
                    .map_err(|_| PocoError::Tampered(t.id))
            }
        }
    }

    /// Check that a target's stored credentials open with the current key.
    #[pg_extern(volatile, parallel_unsafe)]
    fn check_target(target_id: Option<i64>) -> String {
        let id = target_id.unwrap_or_else(|| raise(PocoError::NullArgument("target_id")));
        crate::authz::authorize_target(id);
        let key = keys::current().or_raise();
        match open_credentials(id, &key).or_raise() {
            None => "ok: no password stored".to_string(),
            Some(_) => format!("ok: credentials open with key {}", key.id_hex()),
        }
    }

    /// Re-encrypt every target under the current `poco.key_file`. `old_key_file` names the
    /// key the targets were stored with. All or nothing: one target that opens with neither
    /// key aborts the rotation.
    #[pg_extern(volatile, parallel_unsafe)]
    fn rotate_key(old_key_file: Option<&str>) -> i64 {
        let old_path =
            old_key_file.unwrap_or_else(|| raise(PocoError::NullArgument("old_key_file")));
        let new = keys::current().or_raise();
        let old = load_key_file(old_path).or_raise();
        let mut n = 0;
        for t in catalog::all_targets_for_update().or_raise() {
            let Some(blob) = &t.secret else {
                catalog::set_secret(t.id, None, &new.id_hex());
                continue;
            };
            let aad = t.spec.associated_data(t.id, &t.parent_id);
            if Key::blob_key_id(blob).as_deref() == Some(new.id_hex().as_str()) {
                new.decrypt(t.id, blob, &aad).or_raise(); // already rotated; prove it opens
                continue;
            }
            let pw = old.decrypt(t.id, blob, &aad).or_raise();
            catalog::set_secret(t.id, Some(new.encrypt(&pw, &aad)), &new.id_hex());
            n += 1;
        }
        catalog::log_event(
            "key_rotated",
            None,
            None,
            &format!(
                "{n} target(s) re-encrypted from key {} to key {}",
                old.id_hex(),
                new.id_hex()
            ),
            json!({"from_key": old.id_hex(), "to_key": new.id_hex(), "targets": n}),
        );
        n
    }
}
