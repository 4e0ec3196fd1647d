use poco_core::crypto::{load_key_file, Key};
use poco_core::PocoError;
use std::os::unix::fs::PermissionsExt;

fn key(b: u8) -> Key {
    Key::from_bytes([b; 32])
}

#[test]
fn round_trip_with_fresh_nonces() {
    let k = key(7);
    let a = k.encrypt(b"hunter2", b"aad");
    let b = k.encrypt(b"hunter2", b"aad");
    assert_ne!(a, b, "every encryption uses a fresh nonce");
    assert_eq!(k.decrypt(1, &a, b"aad").unwrap(), b"hunter2");
    assert!(!a.windows(7).any(|w| w == b"hunter2"));
    assert_eq!(Key::blob_key_id(&a).unwrap(), k.id_hex());
}

#[test]
fn tampering_moving_and_wrong_key_are_clear_errors() {
    let k = key(7);
    let blob = k.encrypt(b"hunter2", b"target 1");
    for i in 0..blob.len() {
        let mut t = blob.clone();
        t[i] ^= 0x01;
        let e = k.decrypt(1, &t, b"target 1").unwrap_err();
        assert!(
            matches!(e, PocoError::Tampered(1) | PocoError::WrongKey(1, _)),
            "byte {i}: {e:?}"
        );
    }
    assert_eq!(
        k.decrypt(1, &blob, b"target 2").unwrap_err(),
        PocoError::Tampered(1),
        "moved to another row"
    );
    assert_eq!(
        k.decrypt(1, &blob[..10], b"target 1").unwrap_err(),
        PocoError::Tampered(1),
        "truncated"
    );
    assert_eq!(
        k.decrypt(1, b"", b"target 1").unwrap_err(),
        PocoError::Tampered(1)
    );
    let other = key(8);
    assert!(
        matches!(other.decrypt(1, &blob, b"target 1").unwrap_err(), PocoError::WrongKey(1, id) if id == k.id_hex())
    );
}

#[test]
fn key_file_formats() {
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let a = Key::parse_file_contents("f", format!("{hex}\n").as_bytes()).unwrap();
    let b = Key::parse_file_contents(
        "f",
        &(0..32u8)
            .map(|i| {
                [
                    0x00u8, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ][(i % 16) as usize]
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(a.id_hex(), b.id_hex(), "hex and raw forms of the same key");
    let c =
        Key::parse_file_contents("f", b"ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=\n").unwrap();
    assert_eq!(a.id_hex(), c.id_hex(), "base64 form of the same key");
    for bad in [
        &b"short"[..],
        b"zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        &[0u8; 31],
        &[0u8; 33],
    ] {
        assert!(matches!(
            Key::parse_file_contents("f", bad),
            Err(PocoError::KeyFileFormat(_))
        ));
    }
}

#[test]
fn key_file_permissions() {
    let dir = std::env::temp_dir().join(format!("poco_key_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("key");
    std::fs::write(
        &p,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let ps = p.to_str().unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    load_key_file(ps).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o604)).unwrap();
    assert_eq!(
        load_key_file(ps).unwrap_err(),
        PocoError::KeyFileMode(ps.into())
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o660)).unwrap();
    let root = unsafe { libc_geteuid() } == 0;
    // a root-owned file may be group-readable (as PostgreSQL allows for ssl_key_file), not group-writable
    assert_eq!(
        load_key_file(ps).is_ok(),
        false,
        "group-writable is always refused (root={root})"
    );
    assert!(matches!(
        load_key_file(dir.join("missing").to_str().unwrap()),
        Err(PocoError::KeyFileUnreadable(..))
    ));
    assert!(matches!(
        load_key_file(dir.to_str().unwrap()),
        Err(PocoError::KeyFileUnreadable(..))
    ));
    assert_eq!(load_key_file("").unwrap_err(), PocoError::NoKeyConfigured);
    std::fs::remove_dir_all(&dir).unwrap();
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
