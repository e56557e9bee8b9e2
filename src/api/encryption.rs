//! Encryption at rest (kube-apiserver's `--encryption-provider-config`): the objects of the
//! configured resources (Secrets, typically) are stored as AES-GCM ciphertext, so neither
//! the Raft log, the state machine, snapshots nor backups hold them in plain text.
//!
//! The configuration is Kubernetes' `EncryptionConfiguration` (`apiserver.config.k8s.io/v1`)
//! with the `aesgcm` and `identity` providers: the first provider of a resource writes
//! (`aesgcm`: with its first key), every provider reads. A stored value is
//! `k8s:enc:aesgcm:v1:<key name>:` followed by a 12-byte random nonce and the sealed
//! object, with the object's store key as authenticated data (a ciphertext cannot be moved
//! to another key). Key rotation, as Kubernetes: add the new key second and restart every
//! replica; move it first and restart; rewrite every Secret (`kubectl get secrets -A -o json
//! | kubectl replace -f -`); drop the old key and restart.
//!
//! Owns the process-wide keyring, set once at start ([`install`]) before any request and
//! read-only after. Invariants: a value is sealed before it is proposed to Raft (every write
//! of an object goes through [`seal`]); a value with the encryption prefix is never served
//! without being opened; a ciphertext whose key is not configured is an error, never
//! returned as the object.

use std::borrow::Cow;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;

use super::resources;
use super::status::KubeError;

/// The prefix of every encrypted value.
const PREFIX: &[u8] = b"k8s:enc:";
const AESGCM: &str = "k8s:enc:aesgcm:v1:";

/// One AES-GCM key: its name, algorithm and bytes.
#[derive(Clone)]
struct AesKey {
    name: String,
    alg: &'static ring::aead::Algorithm,
    secret: Vec<u8>,
}

impl AesKey {
    fn key(&self) -> Result<LessSafeKey, KubeError> {
        UnboundKey::new(self.alg, &self.secret)
            .map(LessSafeKey::new)
            .map_err(|_| KubeError::internal("unusable encryption key"))
    }
}

/// One provider of a resource.
#[derive(Clone)]
enum Provider {
    /// AES-GCM with named keys; the first one seals.
    AesGcm(Vec<AesKey>),
    /// Plain text.
    Identity,
}

/// The encryption of the resources under one store prefix.
struct Rule {
    prefix: String,
    providers: Vec<Provider>,
}

/// Every configured resource's providers.
pub struct Keyring {
    rules: Vec<Rule>,
    random: SystemRandom,
}

static KEYRING: OnceLock<Keyring> = OnceLock::new();

/// Makes `k` the process's keyring (once; a second call is an error).
pub fn install(k: Keyring) -> Result<()> {
    KEYRING
        .set(k)
        .map_err(|_| anyhow::anyhow!("the encryption configuration is already installed"))
}

fn keyring() -> Option<&'static Keyring> {
    KEYRING.get()
}

/// Reads an `EncryptionConfiguration` file.
pub fn load(path: &Path) -> Result<Keyring> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the encryption configuration {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

/// Parses an `EncryptionConfiguration` (YAML or JSON).
pub fn parse(text: &str) -> Result<Keyring> {
    let v: Value = serde_yaml::from_str(text).context("not YAML")?;
    if v.get("kind").and_then(Value::as_str) != Some("EncryptionConfiguration") {
        bail!("kind must be EncryptionConfiguration");
    }
    let mut rules = Vec::new();
    for entry in v
        .get("resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let mut providers = Vec::new();
        for p in entry
            .get("providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if p.get("identity").is_some() {
                providers.push(Provider::Identity);
            } else if let Some(a) = p.get("aesgcm") {
                let mut keys = Vec::new();
                for k in a
                    .get("keys")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = k.get("name").and_then(Value::as_str).unwrap_or("");
                    if name.is_empty() || name.contains(':') {
                        bail!("an aesgcm key needs a name without ':'");
                    }
                    let secret = base64::engine::general_purpose::STANDARD
                        .decode(k.get("secret").and_then(Value::as_str).unwrap_or(""))
                        .with_context(|| format!("key {name:?}: the secret is not base64"))?;
                    let alg = match secret.len() {
                        16 => &AES_128_GCM,
                        32 => &AES_256_GCM,
                        n => bail!("key {name:?}: an aesgcm key is 16 or 32 bytes, not {n}"),
                    };
                    UnboundKey::new(alg, &secret)
                        .map_err(|_| anyhow::anyhow!("key {name:?} is not usable"))?;
                    keys.push(AesKey {
                        name: name.to_string(),
                        alg,
                        secret,
                    });
                }
                if keys.is_empty() {
                    bail!("an aesgcm provider needs at least one key");
                }
                providers.push(Provider::AesGcm(keys));
            } else {
                bail!("unsupported provider {p}: aesgcm and identity are");
            }
        }
        if providers.is_empty() {
            bail!("a resource entry needs at least one provider");
        }
        let names: Vec<&str> = entry
            .get("resources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if names.is_empty() {
            bail!("a resource entry needs resources");
        }
        for name in names {
            let (plural, group) = name.split_once('.').unwrap_or((name, ""));
            let r = resources::RESOURCES
                .iter()
                .find(|r| r.plural == plural && r.group == group)
                .with_context(|| format!("{name:?} is not a served resource"))?;
            rules.push(Rule {
                prefix: r.prefix(),
                providers: providers.clone(),
            });
        }
    }
    Ok(Keyring {
        rules,
        random: SystemRandom::new(),
    })
}

impl Keyring {
    fn rule(&self, key: &[u8]) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| key.starts_with(r.prefix.as_bytes()))
    }

    fn seal(&self, key: &[u8], plain: Vec<u8>) -> Result<Vec<u8>, KubeError> {
        let Some(Provider::AesGcm(keys)) = self.rule(key).and_then(|r| r.providers.first()) else {
            return Ok(plain);
        };
        let name = &keys[0].name;
        let k = keys[0].key()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| KubeError::internal("no randomness for a nonce"))?;
        let mut data = plain;
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key),
            &mut data,
        )
        .map_err(|_| KubeError::internal("encryption failed"))?;
        let mut out = Vec::with_capacity(AESGCM.len() + name.len() + 1 + NONCE_LEN + data.len());
        out.extend_from_slice(AESGCM.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// A stored value's object bytes: opened if encrypted; plain text only where
    /// `identity` is a provider (as Kubernetes).
    fn read<'a>(&self, key: &[u8], value: &'a [u8]) -> Result<Cow<'a, [u8]>, KubeError> {
        if value.starts_with(PREFIX) {
            return self.open(key, value).map(Cow::Owned);
        }
        let refused = self
            .rule(key)
            .is_some_and(|r| !r.providers.iter().any(|p| matches!(p, Provider::Identity)));
        if refused {
            return Err(KubeError::internal(
                "stored object is not encrypted and the encryption configuration has no identity provider for it",
            ));
        }
        Ok(Cow::Borrowed(value))
    }

    fn open(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, KubeError> {
        let rest = value
            .strip_prefix(AESGCM.as_bytes())
            .ok_or_else(|| KubeError::internal("stored value of an unknown encryption"))?;
        let colon = rest
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| KubeError::internal("stored ciphertext without a key name"))?;
        let name = std::str::from_utf8(&rest[..colon]).unwrap_or("");
        let body = &rest[colon + 1..];
        if body.len() < NONCE_LEN {
            return Err(KubeError::internal("stored ciphertext too short"));
        }
        let k = self
            .rules
            .iter()
            .flat_map(|r| &r.providers)
            .filter_map(|p| match p {
                Provider::AesGcm(keys) => Some(keys),
                Provider::Identity => None,
            })
            .flatten()
            .find(|k| k.name == name)
            .ok_or_else(|| {
                KubeError::internal(format!(
                    "stored object encrypted with key {name:?}, which is not configured"
                ))
            })?;
        let nonce = Nonce::try_assume_unique_for_key(&body[..NONCE_LEN])
            .map_err(|_| KubeError::internal("bad nonce"))?;
        let mut data = body[NONCE_LEN..].to_vec();
        let plain = k
            .key()?
            .open_in_place(nonce, Aad::from(key), &mut data)
            .map_err(|_| {
                KubeError::internal(format!(
                    "stored object does not decrypt with key {name:?} (tampered, or moved from another key)"
                ))
            })?;
        let n = plain.len();
        data.truncate(n);
        Ok(data)
    }
}

/// The bytes to store for the object at `key`: sealed if its resource is configured so.
pub fn seal(key: &[u8], plain: Vec<u8>) -> Result<Vec<u8>, KubeError> {
    match keyring() {
        Some(k) => k.seal(key, plain),
        None => Ok(plain),
    }
}

/// The object bytes of a stored value: opened if it is encrypted.
pub fn open<'a>(key: &[u8], value: &'a [u8]) -> Result<Cow<'a, [u8]>, KubeError> {
    match keyring() {
        Some(k) => k.read(key, value),
        None if value.starts_with(PREFIX) => Err(KubeError::internal(
            "stored object is encrypted and this replica has no --encryption-provider-config",
        )),
        None => Ok(Cow::Borrowed(value)),
    }
}

/// Whether the value stored at `key` is not what [`seal`] would store now: sealed with a
/// key that is no longer the first, plain where encryption is configured, or sealed where
/// it is not.
pub fn stale(key: &[u8], value: &[u8]) -> bool {
    let encrypted = value.starts_with(PREFIX);
    let Some(k) = keyring() else {
        return encrypted;
    };
    match k.rule(key).and_then(|r| r.providers.first()) {
        Some(Provider::AesGcm(keys)) => {
            let want = format!("{AESGCM}{}:", keys[0].name);
            !value.starts_with(want.as_bytes())
        }
        _ => encrypted,
    }
}

/// Whether values under `prefix` may be stored encrypted (so their bytes cannot be
/// searched as plain text).
pub fn may_encrypt(prefix: &[u8]) -> bool {
    keyring().is_some_and(|k| {
        k.rules.iter().any(|r| {
            prefix.starts_with(r.prefix.as_bytes()) || r.prefix.as_bytes().starts_with(prefix)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(keys: &[(&str, &[u8])], identity_first: bool) -> String {
        let keys: Vec<String> = keys
            .iter()
            .map(|(n, k)| {
                format!(
                    "        - name: {n}\n          secret: {}\n",
                    base64::engine::general_purpose::STANDARD.encode(k)
                )
            })
            .collect();
        let aes = format!("    - aesgcm:\n        keys:\n{}", keys.concat());
        let identity = "    - identity: {}\n";
        let providers = if identity_first {
            format!("{identity}{aes}")
        } else {
            format!("{aes}{identity}")
        };
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n{providers}"
        )
    }

    #[test]
    fn sealed_values_open_with_their_key_only_and_under_their_own_key() {
        let k1 = parse(&config(&[("k1", &[7u8; 32])], false)).unwrap();
        let key = b"/registry/secrets/ns/s";
        let plain = br#"{"data":{"k":"c2VjcmV0"}}"#.to_vec();
        let sealed = k1.seal(key, plain.clone()).unwrap();
        assert!(sealed.starts_with(b"k8s:enc:aesgcm:v1:k1:"));
        assert!(!sealed.windows(8).any(|w| w == b"c2VjcmV0"));
        assert_eq!(k1.open(key, &sealed).unwrap(), plain);
        // Two seals differ (fresh nonces).
        assert_ne!(k1.seal(key, plain.clone()).unwrap(), sealed);
        // Moved to another key, or tampered with: refused.
        assert!(k1.open(b"/registry/secrets/ns/other", &sealed).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(k1.open(key, &bad).is_err());
        // Other resources are left alone.
        let cm = k1
            .seal(b"/registry/configmaps/ns/c", plain.clone())
            .unwrap();
        assert_eq!(cm, plain);
        // Rotation: a new key first still reads the old one; without the old key, no.
        let both = parse(&config(&[("k2", &[9u8; 16]), ("k1", &[7u8; 32])], false)).unwrap();
        assert_eq!(both.open(key, &sealed).unwrap(), plain);
        assert!(both
            .seal(key, plain.clone())
            .unwrap()
            .starts_with(b"k8s:enc:aesgcm:v1:k2:"));
        let only_new = parse(&config(&[("k2", &[9u8; 16])], false)).unwrap();
        assert!(only_new.open(key, &sealed).is_err());
        // identity first: writes plain text, still reads the ciphertext.
        let decrypting = parse(&config(&[("k1", &[7u8; 32])], true)).unwrap();
        assert_eq!(decrypting.seal(key, plain.clone()).unwrap(), plain);
        assert_eq!(decrypting.open(key, &sealed).unwrap(), plain);
        // Plain text reads only where identity is a provider.
        assert_eq!(&*k1.read(key, &plain).unwrap(), &plain[..]);
        let strict =
            parse(&config(&[("k1", &[7u8; 32])], false).replace("    - identity: {}\n", ""))
                .unwrap();
        assert!(strict.read(key, &plain).is_err());
        assert_eq!(&*strict.read(key, &sealed).unwrap(), &plain[..]);
        assert_eq!(
            &*strict.read(b"/registry/configmaps/ns/c", &plain).unwrap(),
            &plain[..]
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (text, why) in [
            ("kind: Nope", "EncryptionConfiguration"),
            (&config(&[("k", &[1u8; 20])], false) as &str, "16 or 32 bytes"),
            (&config(&[("a:b", &[1u8; 16])], false), "without ':'"),
            (
                "kind: EncryptionConfiguration\nresources:\n  - resources: [widgets]\n    providers:\n    - identity: {}\n",
                "not a served resource",
            ),
            (
                "kind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n    - secretbox: {}\n",
                "unsupported provider",
            ),
        ] {
            let e = match parse(text) {
                Ok(_) => panic!("{text} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(why), "{e}");
        }
    }
}
