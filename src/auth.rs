//! Authentication: who a request to the API comes from, as kube-apiserver decides it — a
//! verified client certificate (CN = user, O = groups), else a bearer token from the static
//! token file (`--token-auth-file`) or a ServiceAccount token this cluster signed
//! ([`crate::api::satoken`]), else nobody (anonymous).
//!
//! Owns the token table (read once at start). Invariants:
//! - with authentication off (no client CA, no token file: the plain-HTTP development mode)
//!   every request is let through as before;
//! - with it on, credentials that are offered and do not authenticate (an unknown token)
//!   are a 401 even where anonymous requests are allowed, as Kubernetes does;
//! - anonymous requests get 401 except on the health and version paths, and only with
//!   `--anonymous-auth` (the default, as Kubernetes');
//! - every authenticated user is in `system:authenticated`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::tls::Conn;

/// The group of every authenticated user.
pub const AUTHENTICATED: &str = "system:authenticated";

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user name (`admin`, `system:node:n1`).
    pub name: String,
    /// Its uid (from the token file; empty for certificates).
    pub uid: String,
    /// Its groups, `system:authenticated` included.
    pub groups: Vec<String>,
}

impl User {
    /// Whether it is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Authentication is off: let it through.
    Off,
    /// An authenticated user.
    User(User),
    /// No credentials, on a path anonymous requests may use.
    Anonymous,
    /// 401.
    Unauthorized,
}

/// The authenticator of one replica.
#[derive(Debug, Default)]
pub struct Authenticator {
    /// Client certificates authenticate (the API listener verifies them against a CA).
    certs: bool,
    /// token → user.
    tokens: HashMap<String, User>,
    /// Anonymous requests may use the health and version paths.
    anonymous: bool,
    /// ServiceAccount tokens.
    issuer: Option<std::sync::Arc<crate::api::satoken::Issuer>>,
}

/// The groups of every ServiceAccount.
pub const SERVICE_ACCOUNTS: &str = "system:serviceaccounts";

/// Paths anonymous requests may use (with `--anonymous-auth`).
pub fn anonymous_path(path: &str) -> bool {
    ["/livez", "/readyz", "/healthz", "/version"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
}

/// Splits one CSV line (fields may be double-quoted, with `""` for a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// Reads a static token file as kube-apiserver does: `token,user,uid[,"group1,group2"]`
/// per line; blank lines and `#` comments skipped.
pub fn read_tokens(path: &Path) -> Result<HashMap<String, User>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f = csv_fields(line);
        if f.len() < 3 || f[0].is_empty() || f[1].is_empty() {
            bail!(
                "{} line {}: expected token,user,uid[,\"groups\"]",
                path.display(),
                i + 1
            );
        }
        let mut groups: Vec<String> = f
            .get(3)
            .map(|g| {
                g.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        groups.push(AUTHENTICATED.to_string());
        if out
            .insert(
                f[0].clone(),
                User {
                    name: f[1].clone(),
                    uid: f[2].clone(),
                    groups,
                },
            )
            .is_some()
        {
            bail!("{} line {}: a token given twice", path.display(), i + 1);
        }
    }
    Ok(out)
}

impl Authenticator {
    /// Authentication on: by client certificates (when the listener verifies them), by
    /// `tokens`, anonymous requests to the health and version paths if `anonymous`.
    pub fn new(certs: bool, tokens: HashMap<String, User>, anonymous: bool) -> Authenticator {
        Authenticator {
            certs,
            tokens,
            anonymous,
            issuer: None,
        }
    }

    /// Also authenticates ServiceAccount tokens signed by `issuer`.
    pub fn with_issuer(
        mut self,
        issuer: Option<std::sync::Arc<crate::api::satoken::Issuer>>,
    ) -> Authenticator {
        self.issuer = issuer;
        self
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.certs || !self.tokens.is_empty() || self.issuer.is_some()
    }

    /// Who the request with `headers`, on connection `conn`, to `path` is from.
    pub fn authenticate(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        conn: Option<&Conn>,
    ) -> Outcome {
        if !self.enabled() {
            return Outcome::Off;
        }
        if let Some(id) = conn.and_then(|c| c.cert.as_ref()).filter(|_| self.certs) {
            let mut groups = id.groups.clone();
            groups.push(AUTHENTICATED.to_string());
            return Outcome::User(User {
                name: id.user.clone(),
                uid: String::new(),
                groups,
            });
        }
        if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
            let token = auth
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, rest) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                })
                .filter(|t| !t.is_empty());
            if let Some(u) = token.and_then(|t| self.tokens.get(t)) {
                return Outcome::User(u.clone());
            }
            // A ServiceAccount token (whether its account still exists is the caller's
            // check: the user's uid is the account's).
            let sa = token
                .zip(self.issuer.as_ref())
                .and_then(|(t, i)| i.verify(t).ok());
            return match sa {
                Some(c) => Outcome::User(User {
                    name: c.user(),
                    uid: c.uid.clone(),
                    groups: vec![
                        SERVICE_ACCOUNTS.to_string(),
                        format!("{SERVICE_ACCOUNTS}:{}", c.namespace),
                        AUTHENTICATED.to_string(),
                    ],
                }),
                None => Outcome::Unauthorized,
            };
        }
        if self.anonymous && anonymous_path(path) {
            Outcome::Anonymous
        } else {
            Outcome::Unauthorized
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::CertIdentity;

    fn headers(auth: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_token_file_reads_as_kubernetes_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.csv");
        std::fs::write(
            &f,
            "# comment\n\nsecret1,alice,u1,\"dev,ops\"\nsecret2,bob,u2\n",
        )
        .unwrap();
        let t = read_tokens(&f).unwrap();
        assert_eq!(
            t["secret1"],
            User {
                name: "alice".into(),
                uid: "u1".into(),
                groups: vec!["dev".into(), "ops".into(), AUTHENTICATED.into()]
            }
        );
        assert_eq!(t["secret2"].groups, vec![AUTHENTICATED.to_string()]);
        std::fs::write(&f, "onlytoken\n").unwrap();
        assert!(read_tokens(&f).unwrap_err().to_string().contains("line 1"));
        std::fs::write(&f, "a,b,c\na,d,e\n").unwrap();
        assert!(read_tokens(&f).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn certificates_then_tokens_then_anonymous_on_health_paths_only() {
        let tokens = HashMap::from([(
            "t0k".to_string(),
            User {
                name: "bob".into(),
                uid: "1".into(),
                groups: vec![AUTHENTICATED.into()],
            },
        )]);
        let a = Authenticator::new(true, tokens, true);
        let cert = Conn {
            tls: true,
            cert: Some(CertIdentity {
                user: "system:node:n1".into(),
                groups: vec!["system:nodes".into()],
            }),
            remote: None,
        };
        match a.authenticate("/api/v1/pods", &headers(None), Some(&cert)) {
            Outcome::User(u) => {
                assert_eq!(u.name, "system:node:n1");
                assert!(u.in_group("system:nodes") && u.in_group(AUTHENTICATED));
            }
            o => panic!("{o:?}"),
        }
        let plain = Conn::default();
        assert!(matches!(
            a.authenticate("/api/v1/pods", &headers(Some("Bearer t0k")), Some(&plain)),
            Outcome::User(u) if u.name == "bob"
        ));
        // A wrong token is refused even where anonymous requests are allowed.
        assert_eq!(
            a.authenticate("/version", &headers(Some("Bearer nope")), Some(&plain)),
            Outcome::Unauthorized
        );
        assert_eq!(
            a.authenticate("/version", &headers(None), Some(&plain)),
            Outcome::Anonymous
        );
        assert_eq!(
            a.authenticate("/livez/ping", &headers(None), None),
            Outcome::Anonymous
        );
        for p in ["/api/v1/pods", "/metrics", "/v3/kv/range", "/versionx"] {
            assert_eq!(
                a.authenticate(p, &headers(None), None),
                Outcome::Unauthorized,
                "{p}"
            );
        }
        let strict = Authenticator::new(true, HashMap::new(), false);
        assert_eq!(
            strict.authenticate("/version", &headers(None), None),
            Outcome::Unauthorized
        );
        assert_eq!(
            Authenticator::default().authenticate("/api/v1/pods", &headers(None), None),
            Outcome::Off
        );
    }
}
