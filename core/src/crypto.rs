//! Credentials at rest: AES-256-GCM with a fresh random 96-bit nonce per encryption and the
//! target's identity as associated data.
//!
//! Stored form: `b"P1"` | key id (8 bytes) | nonce (12 bytes) | ciphertext and tag.
//! The key id (a SHA-256 fingerprint, not the key) lets a wrong key be told apart from a
//! tampered ciphertext, and lets rotation find what is still under the old key.

use crate::error::{PocoError, Result};
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::fmt;

const MAGIC: &[u8; 2] = b"P1";
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const HEADER: usize = 2 + ID_LEN + NONCE_LEN;

#[derive(Clone)]
pub struct Key {
    bytes: [u8; 32],
    id: [u8; ID_LEN],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.id_hex())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hex decoding is six lines; not worth a crate.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        let mut h = Sha256::new();
        h.update(b"poco_sync key id v1\0");
        h.update(bytes);
        let digest = h.finalize();
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        Key { bytes, id }
    }

    /// A key file holds 64 hex digits, 44 characters of standard base64, or 32 raw bytes
    /// (surrounding white space ignored for the text forms).
    pub fn parse_file_contents(path: &str, contents: &[u8]) -> Result<Key> {
        let bad = || PocoError::KeyFileFormat(path.to_string());
        let text = std::str::from_utf8(contents).ok().map(str::trim);
        let decoded: Option<Vec<u8>> = match text {
            Some(t) if t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit()) => unhex(t),
            Some(t) if t.len() == 44 => base64::engine::general_purpose::STANDARD.decode(t).ok(),
            _ if contents.len() == 32 => Some(contents.to_vec()),
            _ => None,
        };
        let v = decoded.filter(|v| v.len() == 32).ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&v);
        Ok(Key::from_bytes(bytes))
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let cipher = Aes256Gcm::new_from_slice(&self.bytes).expect("32-byte key");
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// The key id a stored blob was made with, if the blob is well-formed.
    pub fn blob_key_id(blob: &[u8]) -> Option<String> {
        (blob.len() >= HEADER + 16 && &blob[..2] == MAGIC).then(|| hex(&blob[2..2 + ID_LEN]))
    }

    /// Decrypt a blob of target `target_id`. A blob made with another key and a blob that
    /// fails authentication give different errors; neither shows any byte of the blob.
    pub fn decrypt(&self, target_id: i64, blob: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        if blob.len() < HEADER + 16 || &blob[..2] != MAGIC {
            return Err(PocoError::Tampered(target_id));
        }
        if blob[2..2 + ID_LEN] != self.id {
            return Err(PocoError::WrongKey(target_id, hex(&blob[2..2 + ID_LEN])));
        }
        let cipher = Aes256Gcm::new_from_slice(&self.bytes).expect("32-byte key");
        let nonce = Nonce::from_slice(&blob[2 + ID_LEN..HEADER]);
        cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &blob[HEADER..],
                    aad,
                },
            )
            .map_err(|_| PocoError::Tampered(target_id))
    }
}

/// Read and check a key file: a regular file, not accessible by group or others (as
/// PostgreSQL requires of `ssl_key_file`: a root-owned file may be group-readable).
pub fn load_key_file(path: &str) -> Result<Key> {
    use std::os::unix::fs::MetadataExt;
    if path.trim().is_empty() {
        return Err(PocoError::NoKeyConfigured);
    }
    let unreadable =
        |e: std::io::Error| PocoError::KeyFileUnreadable(path.to_string(), e.kind().to_string());
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(PocoError::KeyFileUnreadable(
            path.to_string(),
            "not a regular file".into(),
        ));
    }
    let mode = meta.mode() & 0o777;
    let ok = if meta.uid() == 0 {
        mode & 0o037 == 0
    } else {
        mode & 0o077 == 0
    };
    if !ok {
        return Err(PocoError::KeyFileMode(path.to_string()));
    }
    let contents = std::fs::read(path).map_err(unreadable)?;
    Key::parse_file_contents(path, &contents)
}
