//! The audit log (kube-apiserver's `--audit-log-path`): one JSON line per API request, in
//! Kubernetes' `audit.k8s.io/v1` Event shape at the `Metadata` level — who (user, groups,
//! source address, user agent), what (verb, resource, namespace, name, or the path), and the
//! response code — written when the response starts.
//!
//! Owns the log file and its backups. Invariants: recording never blocks a request (a
//! bounded queue; when it is full the event is dropped and counted in
//! `flotilla_audit_events_dropped_total`); the file is rotated past `--audit-log-maxsize`,
//! keeping `--audit-log-maxbackup` older files (`<path>.1` the newest); lines are whole
//! (one write each, flushed per batch).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Events queued for the writer at most.
const QUEUE: usize = 10_000;

/// The auditor of one replica.
pub struct Auditor {
    tx: mpsc::Sender<Vec<u8>>,
    dropped: prometheus::IntCounter,
}

/// What the log says of one request.
pub struct Record<'a> {
    /// The request id (`auditID`).
    pub id: &'a str,
    /// The authorization verb (`get`, `list`, `create`, ...).
    pub verb: &'a str,
    /// The request URI (path and query).
    pub uri: &'a str,
    /// Who, if authenticated (or the anonymous user).
    pub user: Option<&'a crate::auth::User>,
    /// The client's address.
    pub source: Option<SocketAddr>,
    /// Its `User-Agent`.
    pub user_agent: &'a str,
    /// The response code.
    pub code: u16,
    /// A stream (watch, followed log, exec): recorded when the response starts.
    pub streaming: bool,
    /// When the request arrived.
    pub received: std::time::SystemTime,
}

fn micros(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let base = crate::api::meta::rfc3339(secs);
    // `2026-01-02T03:04:05Z` → `2026-01-02T03:04:05.123456Z`.
    format!("{}.{:06}Z", base.trim_end_matches('Z'), d.subsec_micros())
}

/// The audit Event of one request.
pub fn event(r: &Record<'_>) -> Value {
    let path = r.uri.split('?').next().unwrap_or("");
    let mut e = json!({
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": r.id,
        "stage": if r.streaming { "ResponseStarted" } else { "ResponseComplete" },
        "requestURI": r.uri,
        "verb": r.verb,
        "user": match r.user {
            Some(u) => json!({"username": u.name, "uid": u.uid, "groups": u.groups}),
            None => json!({}),
        },
        "sourceIPs": r.source.map(|s| vec![s.ip().to_string()]).unwrap_or_default(),
        "userAgent": r.user_agent,
        "responseStatus": {"metadata": {}, "code": r.code},
        "requestReceivedTimestamp": micros(r.received),
        "stageTimestamp": micros(std::time::SystemTime::now()),
    });
    if let Some(crate::api::Route::Resource {
        r: res,
        namespace,
        name,
        sub,
    }) = crate::api::route(path)
    {
        let mut o = json!({"resource": res.plural, "apiVersion": res.version});
        if !res.group.is_empty() {
            o["apiGroup"] = json!(res.group);
        }
        if let Some(ns) = namespace {
            o["namespace"] = json!(ns);
        }
        if let Some(n) = name {
            o["name"] = json!(n);
        }
        if let Some(s) = sub {
            o["subresource"] = json!(s);
        }
        e["objectRef"] = o;
    }
    e
}

impl Auditor {
    /// Starts the writer of `path` (rotated past `max_bytes`, keeping `backups` old files);
    /// `dropped` counts events lost to a full queue.
    pub fn start(
        path: PathBuf,
        max_bytes: u64,
        backups: usize,
        dropped: prometheus::IntCounter,
    ) -> anyhow::Result<Auditor> {
        use anyhow::Context;
        let open = |p: &PathBuf| {
            use std::os::unix::fs::OpenOptionsExt;
            // Who did what: for the owner's eyes only.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("opening the audit log {}", p.display()))
        };
        let mut file = open(&path)?;
        let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file.try_clone().expect("a file handle"));
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                        if batch.len() >= 1000 {
                            break;
                        }
                    }
                    for line in batch {
                        if max_bytes > 0 && size + line.len() as u64 > max_bytes && size > 0 {
                            let _ = out.flush();
                            for i in (1..backups).rev() {
                                let _ = std::fs::rename(
                                    format!("{}.{i}", path.display()),
                                    format!("{}.{}", path.display(), i + 1),
                                );
                            }
                            if backups > 0 {
                                let _ = std::fs::rename(&path, format!("{}.1", path.display()));
                            } else {
                                let _ = std::fs::remove_file(&path);
                            }
                            match open(&path) {
                                Ok(f) => {
                                    file = f;
                                    out = std::io::BufWriter::new(
                                        file.try_clone().expect("a file handle"),
                                    );
                                    size = 0;
                                }
                                Err(e) => tracing::warn!(%e, "audit log rotation failed"),
                            }
                        }
                        if out.write_all(&line).is_ok() {
                            size += line.len() as u64;
                        }
                    }
                    let _ = out.flush();
                }
            })?;
        Ok(Auditor { tx, dropped })
    }

    /// Queues the event of one request (dropped and counted if the writer is behind).
    pub fn record(&self, r: &Record<'_>) {
        let mut line = serde_json::to_vec(&event(r)).expect("an event serializes");
        line.push(b'\n');
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_says_who_did_what_to_which_object_and_how_it_went() {
        let u = crate::auth::User {
            name: "val".into(),
            uid: "2".into(),
            groups: vec!["viewers".into()],
        };
        let e = event(&Record {
            id: "abc",
            verb: "get",
            uri: "/api/v1/namespaces/team/secrets/s1?x=1",
            user: Some(&u),
            source: Some("127.0.0.9:4000".parse().unwrap()),
            user_agent: "kubectl/v1.32",
            code: 403,
            streaming: false,
            received: std::time::SystemTime::now(),
        });
        assert_eq!(e["user"]["username"], "val");
        assert_eq!(e["verb"], "get");
        assert_eq!(e["objectRef"]["resource"], "secrets");
        assert_eq!(e["objectRef"]["namespace"], "team");
        assert_eq!(e["objectRef"]["name"], "s1");
        assert_eq!(e["responseStatus"]["code"], 403);
        assert_eq!(e["sourceIPs"][0], "127.0.0.9");
        assert!(e["stageTimestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn the_log_rotates_and_keeps_its_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let dropped = prometheus::IntCounter::new("d", "d").unwrap();
        let a = Auditor::start(path.clone(), 2000, 2, dropped).unwrap();
        for i in 0..100 {
            a.record(&Record {
                id: &format!("{i}"),
                verb: "list",
                uri: "/api/v1/pods",
                user: None,
                source: None,
                user_agent: "",
                code: 200,
                streaming: false,
                received: std::time::SystemTime::now(),
            });
        }
        drop(a);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let backups = path.with_extension("log.2").exists();
            let lines = std::fs::read_to_string(&path).unwrap_or_default();
            if backups && lines.lines().any(|l| l.contains("\"auditID\":\"99\"")) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no rotation");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for f in [
            path.clone(),
            path.with_extension("log.1"),
            path.with_extension("log.2"),
        ] {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(
                text.len() <= 2000,
                "{} is {} bytes",
                f.display(),
                text.len()
            );
            for l in text.lines() {
                let v: Value = serde_json::from_str(l).expect("whole lines");
                assert_eq!(v["kind"], "Event");
            }
        }
        assert!(!path.with_extension("log.3").exists());
    }
}
