//! The ledger's Ed25519 Pay Token keys: a JWK set in a file (`--token-keys`), kept by the
//! ledger alone. The first private key signs the tokens the ledger issues; every key
//! verifies, and their public halves are published at `GET /.well-known/jwks.json` for the
//! gateways, which can then verify tokens but never mint one.
//!
//! Rotation is by `kid`: add a new key at the front (`paystile-ledger token-keys add`), give
//! the gateways the new public key, restart the ledger (it now signs with the new key while
//! the old one still verifies), and remove the old key once its last token has expired.

use std::fs;
use std::io::Write;
use std::path::Path;

use paystile_protocol::jwk::{Jwk, Jwks};
use paystile_protocol::jws::{Key, SigningKey};
use paystile_protocol::pay_token;
use rand::TryRngCore;

/// The keys of a key file.
#[derive(Clone, Debug, Default)]
pub struct TokenKeys {
    /// The first private key: what the ledger signs with.
    pub signing: Option<SigningKey>,
    /// Every key's public half, in the file's order.
    pub verifying: Vec<Key>,
}

impl TokenKeys {
    /// Reads and checks the key file at `path`: a JWK set of Ed25519 keys, each with a
    /// unique `kid`.
    pub fn load(path: &Path) -> Result<TokenKeys, String> {
        let text =
            fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let set: Jwks = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a JWK set of Ed25519 keys: {e}", path.display()))?;
        TokenKeys::from_set(&set).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn from_set(set: &Jwks) -> Result<TokenKeys, String> {
        if set.keys.is_empty() {
            return Err("keys: list at least one key".into());
        }
        let mut keys = TokenKeys::default();
        for (i, jwk) in set.keys.iter().enumerate() {
            let Some(kid) = &jwk.kid else {
                return Err(format!("keys[{i}].kid: required (keys rotate by kid)"));
            };
            pay_token::check_id(kid).map_err(|problem| format!("keys[{i}].kid {problem}"))?;
            if keys.verifying.iter().any(|key| key.kid() == Some(kid)) {
                return Err(format!("keys[{i}].kid: {kid} is used by another key"));
            }
            let key = match &jwk.d {
                Some(_) => {
                    let signing = jwk.signing_key().map_err(|e| format!("keys[{i}].{e}"))?;
                    let verifying = signing.verifying_key();
                    keys.signing.get_or_insert(signing);
                    verifying
                }
                None => jwk.verifying_key().map_err(|e| format!("keys[{i}].{e}"))?,
            };
            keys.verifying.push(key);
        }
        Ok(keys)
    }

    /// The public key set gateways are given.
    pub fn public(&self) -> Jwks {
        Jwks { keys: self.verifying.iter().filter_map(Jwk::public).collect() }
    }
}

/// Adds a new private key `kid` at the front of the key file at `path` (creating it, readable
/// by its owner only), so that the ledger signs with it from its next start; answers its
/// public JWK.
pub fn add_key(path: &Path, kid: &str) -> Result<Jwk, String> {
    let mut set = match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<Jwks>(&text)
            .map_err(|e| format!("{}: not a JWK set: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Jwks::default(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| format!("no randomness for a new key: {e}"))?;
    let private = Jwk::private(&seed, kid);
    set.keys.insert(0, private.clone());
    // Checked as the ledger will read it: a duplicate kid, say, is refused now.
    let keys = TokenKeys::from_set(&set).map_err(|e| format!("{}: {e}", path.display()))?;
    write(path, &set)?;
    keys.signing
        .as_ref()
        .and_then(|signing| Jwk::public(&signing.verifying_key()))
        .ok_or_else(|| "the new key does not sign".to_owned())
}

/// Removes key `kid` from the key file at `path`: tokens it signed no longer verify once the
/// ledger restarts. The last key is kept (a ledger needs one to sign with).
pub fn remove_key(path: &Path, kid: &str) -> Result<(), String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut set = serde_json::from_str::<Jwks>(&text)
        .map_err(|e| format!("{}: not a JWK set: {e}", path.display()))?;
    let before = set.keys.len();
    set.keys.retain(|key| key.kid.as_deref() != Some(kid));
    if set.keys.len() == before {
        return Err(format!("{}: no key {kid}", path.display()));
    }
    TokenKeys::from_set(&set)
        .map_err(|e| format!("{}: {e} (the last key stays)", path.display()))?;
    write(path, &set)
}

/// Writes `set` to `path` through a file only its owner may read, renamed into place.
pub fn write(path: &Path, set: &Jwks) -> Result<(), String> {
    let text = serde_json::to_string_pretty(set).map_err(|e| e.to_string())?;
    let partial = path.with_extension("partial");
    // A new file, so that its mode is ours: a leftover one may be readable by others.
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let write = |options: &fs::OpenOptions| -> std::io::Result<()> {
        match fs::remove_file(&partial) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = options.open(&partial)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&partial, path)?;
        // The rename itself survives a crash once the directory is synced.
        match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            Some(dir) => fs::File::open(dir)?.sync_all(),
            None => fs::File::open(".")?.sync_all(),
        }
    };
    write(&options).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use paystile_protocol::jws;

    use super::*;

    /// The key file is readable by its owner only, even over a leftover partial file that
    /// others could read.
    #[cfg(unix)]
    #[test]
    fn the_key_file_is_its_owner_s_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("token-keys.json");
        fs::write(path.with_extension("partial"), "left over").unwrap();
        fs::set_permissions(path.with_extension("partial"), fs::Permissions::from_mode(0o644))
            .unwrap();
        add_key(&path, "2026-12").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!path.with_extension("partial").exists());
    }

    #[test]
    fn a_removed_key_no_longer_verifies_and_the_last_one_stays() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("token-keys.json");
        add_key(&path, "old").unwrap();
        add_key(&path, "new").unwrap();
        remove_key(&path, "old").unwrap();
        let keys = TokenKeys::load(&path).unwrap();
        let kids: Vec<_> = keys.verifying.iter().map(|k| k.kid().unwrap().to_owned()).collect();
        assert_eq!(kids, ["new"]);
        assert!(remove_key(&path, "old").unwrap_err().contains("no key old"));
        assert!(remove_key(&path, "new").unwrap_err().contains("the last key stays"));
        assert_eq!(TokenKeys::load(&path).unwrap().verifying.len(), 1);
    }

    #[test]
    fn the_newest_key_signs_and_every_key_verifies() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("token-keys.json");
        let old = add_key(&path, "2026-11").unwrap();
        let new = add_key(&path, "2026-12").unwrap();
        assert_eq!((old.kid.as_deref(), new.kid.as_deref()), (Some("2026-11"), Some("2026-12")));
        assert_eq!((old.d.as_deref(), new.d.as_deref()), (None, None), "public halves only");
        let keys = TokenKeys::load(&path).unwrap();
        let signing = keys.signing.as_ref().unwrap();
        assert_eq!(signing.kid(), Some("2026-12"));
        let token = jws::sign(b"{}", signing);
        assert!(jws::verify(&token, &keys.verifying).is_ok());
        // The published set has both public keys, newest first, and no private part.
        let public = serde_json::to_value(keys.public()).unwrap();
        assert_eq!(public["keys"][0]["kid"], "2026-12");
        assert_eq!(public["keys"][1]["kid"], "2026-11");
        assert!(public["keys"][0].get("d").is_none() && public["keys"][1].get("d").is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key file is readable by others: {mode:o}");
        }
        assert!(add_key(&path, "2026-12").unwrap_err().contains("used by another key"));
    }

    #[test]
    fn a_key_file_is_checked_member_by_member() {
        let bad = |json: serde_json::Value| {
            TokenKeys::from_set(&serde_json::from_value(json).unwrap()).unwrap_err()
        };
        assert_eq!(bad(serde_json::json!({"keys": []})), "keys: list at least one key");
        let no_kid = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]});
        assert!(bad(no_kid).starts_with("keys[0].kid: required"));
        let wrong_d = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "d": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}]});
        assert!(bad(wrong_d).starts_with("keys[0].d: is not the private key of x"));
    }
}
