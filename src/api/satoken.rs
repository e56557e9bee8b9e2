//! ServiceAccount tokens, as Kubernetes' bound tokens: `POST
//! serviceaccounts/<name>/token` (TokenRequest; `kubectl create token`) issues a JWT signed
//! with the cluster's key (ES256, `--service-account-signing-key-file`, the same file on
//! every replica), and the API authenticates requests bearing one as
//! `system:serviceaccount:<namespace>:<name>` in `system:serviceaccounts` and
//! `system:serviceaccounts:<namespace>`.
//!
//! Owns the signing key. Invariants: a token authenticates only if its signature verifies
//! with this key, it has not expired, its issuer is this cluster's and its audience
//! includes it; and (checked by the gateway against the store) only while its
//! ServiceAccount still exists with the uid the token names — deleting the account revokes
//! its tokens.

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Shortest and longest validity a token may be asked for, and the default (Kubernetes').
pub const MIN_SECONDS: i64 = 600;
/// The longest validity granted.
pub const MAX_SECONDS: i64 = 48 * 3600;
/// The validity when none is asked for.
pub const DEFAULT_SECONDS: i64 = 3600;

/// The cluster's token issuer.
pub struct Issuer {
    key: EcdsaKeyPair,
    public: Vec<u8>,
    kid: String,
    /// `iss`, also the API's audience.
    pub issuer: String,
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The account's namespace.
    pub namespace: String,
    /// The account's name.
    pub name: String,
    /// The account's uid when the token was issued.
    pub uid: String,
}

impl Claims {
    /// The user name.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issuer({}, kid {})", self.issuer, self.kid)
    }
}

impl Issuer {
    /// The issuer signing with the ECDSA P-256 key (PKCS#8 PEM) in `path`.
    pub fn load(path: &Path, issuer: &str) -> Result<Issuer> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
            .with_context(|| format!("reading a PKCS#8 private key from {}", path.display()))?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("{} is not an ECDSA P-256 key: {e}", path.display()))?;
        let public = key.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        Ok(Issuer {
            kid: B64.encode(&digest.as_ref()[..16]),
            key,
            public,
            issuer: issuer.to_string(),
        })
    }

    /// A token for the ServiceAccount `namespace/name` (uid `uid`) for `audiences` (the
    /// API's when empty), valid `seconds`; and its expiry (Unix seconds).
    pub fn issue(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        audiences: &[String],
        seconds: i64,
    ) -> Result<(String, i64)> {
        let iat = now();
        let exp = iat + seconds;
        let aud = if audiences.is_empty() {
            vec![self.issuer.clone()]
        } else {
            audiences.to_vec()
        };
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let claims = json!({
            "aud": aud,
            "exp": exp,
            "iat": iat,
            "nbf": iat,
            "iss": self.issuer,
            "jti": format!("{:032x}", rand::random::<u128>()),
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": uid},
            },
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header)?),
            B64.encode(serde_json::to_vec(&claims)?)
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing failed"))?;
        Ok((format!("{signing_input}.{}", B64.encode(sig.as_ref())), exp))
    }

    /// The claims of `token` if it is one of this cluster's, valid now, for the API.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("not a JWT");
        };
        let header: Value = serde_json::from_slice(&B64.decode(h)?)?;
        if header["alg"] != "ES256" {
            bail!("unsupported algorithm");
        }
        let sig = B64.decode(s)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(format!("{h}.{c}").as_bytes(), &sig)
            .map_err(|_| anyhow::anyhow!("bad signature"))?;
        let claims: Value = serde_json::from_slice(&B64.decode(c)?)?;
        let t = now();
        if claims["exp"].as_i64().is_none_or(|exp| exp <= t) {
            bail!("expired");
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| nbf > t + 60) {
            bail!("not valid yet");
        }
        if claims["iss"] != self.issuer.as_str() {
            bail!("another issuer");
        }
        let aud_ok = match &claims["aud"] {
            Value::String(a) => *a == self.issuer,
            Value::Array(a) => a.iter().any(|x| *x == self.issuer.as_str()),
            _ => false,
        };
        if !aud_ok {
            bail!("not for this API");
        }
        let k = &claims["kubernetes.io"];
        let text = |v: &Value| v.as_str().unwrap_or("").to_string();
        let out = Claims {
            namespace: text(&k["namespace"]),
            name: text(&k["serviceaccount"]["name"]),
            uid: text(&k["serviceaccount"]["uid"]),
        };
        if out.namespace.is_empty() || out.name.is_empty() || claims["sub"] != out.user().as_str() {
            bail!("not a ServiceAccount token");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(dir: &Path, name: &str) -> Issuer {
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.join(name);
        std::fs::write(&path, key.serialize_pem()).unwrap();
        Issuer::load(&path, "https://flotilla.test").unwrap()
    }

    #[test]
    fn tokens_verify_with_their_key_only_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let a = issuer(dir.path(), "a.key");
        let (token, exp) = a.issue("team", "robot", "u-1", &[], 600).unwrap();
        assert!(exp > now());
        let c = a.verify(&token).unwrap();
        assert_eq!(c.user(), "system:serviceaccount:team:robot");
        assert_eq!(c.uid, "u-1");
        // Another cluster's key, a changed claim, an expired token, another audience: no.
        let b = issuer(dir.path(), "b.key");
        assert!(b.verify(&token).is_err());
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims["kubernetes.io"]["namespace"] = json!("kube-system");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&claims).unwrap()),
            parts[2]
        );
        assert!(a
            .verify(&forged)
            .unwrap_err()
            .to_string()
            .contains("signature"));
        let (old, _) = a.issue("team", "robot", "u-1", &[], -1).unwrap();
        assert!(a.verify(&old).unwrap_err().to_string().contains("expired"));
        let (other, _) = a
            .issue("team", "robot", "u-1", &["vault".to_string()], 600)
            .unwrap();
        assert!(a
            .verify(&other)
            .unwrap_err()
            .to_string()
            .contains("not for this API"));
        assert!(a.verify("not.a.token").is_err());
    }
}
