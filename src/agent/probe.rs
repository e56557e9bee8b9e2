//! Container probes: liveness, readiness and startup, by exec, httpGet or tcpSocket, with
//! Kubernetes' timing fields.
//!
//! Owns each probe's schedule and consecutive-result counters. Invariants, as the kubelet's:
//! - nothing is probed before `initialDelaySeconds` after the container started, then every
//!   `periodSeconds`; one try takes at most `timeoutSeconds`;
//! - a result flips only after `successThreshold` consecutive successes or
//!   `failureThreshold` consecutive failures;
//! - until the startup probe has succeeded, liveness and readiness are not run (and the
//!   container is not ready);
//! - liveness starts as passing; readiness and startup start as not passed.

use std::time::{Duration, Instant};

use serde_json::Value;

/// How a probe checks.
#[derive(Debug, Clone)]
pub enum Check {
    /// Runs a command in the container's working directory; exit 0 passes.
    Exec(Vec<String>),
    /// GETs a URL; 200–399 passes.
    Http {
        /// Host (the pod IP when empty).
        host: String,
        /// Port.
        port: u16,
        /// Path and query.
        path: String,
    },
    /// Connects; a connection passes.
    Tcp {
        /// Host (the pod IP when empty).
        host: String,
        /// Port.
        port: u16,
    },
}

/// One probe of one container.
#[derive(Debug, Clone)]
pub struct Probe {
    check: Check,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    next: Option<Instant>,
    successes: u32,
    failures: u32,
    initial: bool,
    /// The current verdict.
    pub passing: bool,
    /// The last try's result.
    pub last_ok: bool,
}

fn secs(p: &Value, k: &str, default: u64, min: u64) -> Duration {
    Duration::from_secs(p.get(k).and_then(Value::as_u64).unwrap_or(default).max(min))
}

/// A named or numbered port of `container`.
fn port(v: Option<&Value>, container: &Value) -> Option<u16> {
    match v? {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok().or_else(|| {
            container
                .get("ports")
                .and_then(Value::as_array)?
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(s))?
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
        }),
        _ => None,
    }
}

/// Runs a lifecycle hook (`postStart` or `preStop`: `exec` or `httpGet`) of `container`
/// (its spec, for named ports) once, within `timeout`.
pub async fn hook(
    hook: &Value,
    container: &Value,
    pod_ip: &str,
    handle: &dyn super::runtime::Container,
    timeout: Duration,
) -> Result<(), String> {
    let mut spec = serde_json::json!({"hook": hook});
    if let Some(ports) = container.get("ports") {
        spec["ports"] = ports.clone();
    }
    let p = Probe::parse(&spec, "hook").ok_or_else(|| {
        "the hook has neither exec nor httpGet (or names an unknown port)".to_string()
    })?;
    match tokio::time::timeout(timeout, attempt(&p.check, pod_ip, handle, timeout)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(match &p.check {
            Check::Exec(argv) => format!("command {argv:?} failed"),
            Check::Http { port, path, .. } => format!("GET {path} on port {port} failed"),
            Check::Tcp { port, .. } => format!("connecting to port {port} failed"),
        }),
        Err(_) => Err(format!("did not finish within {timeout:?}")),
    }
}

impl Probe {
    /// The probe at `container[key]` (`livenessProbe`, `readinessProbe`, `startupProbe`).
    pub fn parse(container: &Value, key: &str) -> Option<Probe> {
        let p = container.get(key)?;
        let check = if let Some(cmd) = p.pointer("/exec/command").and_then(Value::as_array) {
            Check::Exec(
                cmd.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect(),
            )
        } else if let Some(h) = p.get("httpGet") {
            Check::Http {
                host: h
                    .get("host")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                port: port(h.get("port"), container)?,
                path: h
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or("/")
                    .to_string(),
            }
        } else if let Some(t) = p.get("tcpSocket") {
            Check::Tcp {
                host: t
                    .get("host")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                port: port(t.get("port"), container)?,
            }
        } else {
            return None;
        };
        Some(Probe {
            check,
            initial_delay: secs(p, "initialDelaySeconds", 0, 0),
            period: secs(p, "periodSeconds", 10, 1),
            timeout: secs(p, "timeoutSeconds", 1, 1),
            success_threshold: p
                .get("successThreshold")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1) as u32,
            failure_threshold: p
                .get("failureThreshold")
                .and_then(Value::as_u64)
                .unwrap_or(3)
                .max(1) as u32,
            next: None,
            successes: 0,
            failures: 0,
            initial: key == "livenessProbe",
            passing: key == "livenessProbe",
            last_ok: false,
        })
    }

    /// Starts over for a container (re)started at `started`.
    pub fn reset(&mut self, started: Instant) {
        self.next = Some(started + self.initial_delay);
        self.successes = 0;
        self.failures = 0;
        self.passing = self.initial;
    }

    /// Starts over for a container already running (adopted after an agent restart): no
    /// initial delay.
    pub fn resume(&mut self, now: Instant) {
        self.reset(now);
        self.next = Some(now);
    }

    /// `failureThreshold` consecutive failures.
    pub fn failed(&self) -> bool {
        self.failures >= self.failure_threshold
    }

    /// Whether a try is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|t| t <= now)
    }

    /// Runs one try (if due) and updates the verdict; true if the verdict changed.
    pub async fn run(
        &mut self,
        now: Instant,
        pod_ip: &str,
        container: &dyn super::runtime::Container,
    ) -> bool {
        if !self.due(now) {
            return false;
        }
        self.next = Some(now + self.period);
        let ok = tokio::time::timeout(
            self.timeout,
            attempt(&self.check, pod_ip, container, self.timeout),
        )
        .await
        .unwrap_or(false);
        let before = self.passing;
        self.last_ok = ok;
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= self.success_threshold {
                self.passing = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= self.failure_threshold {
                self.passing = false;
            }
        }
        before != self.passing
    }
}

async fn attempt(
    check: &Check,
    pod_ip: &str,
    container: &dyn super::runtime::Container,
    timeout: Duration,
) -> bool {
    let host = |h: &str| {
        if h.is_empty() {
            pod_ip.to_string()
        } else {
            h.to_string()
        }
    };
    match check {
        Check::Exec(argv) => container.exec(argv.clone(), timeout).await == Ok(0),
        Check::Tcp { host: h, port } => tokio::net::TcpStream::connect((host(h).as_str(), *port))
            .await
            .is_ok(),
        Check::Http {
            host: h,
            port,
            path,
        } => {
            let client = crate::client::Client::new(Vec::new(), Duration::from_secs(3600));
            match client
                .get_stream(&format!("{}:{port}", host(h)), path)
                .await
            {
                Ok(resp) => (200..400).contains(&resp.status().as_u16()),
                Err(_) => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::agent::runtime::{BoxFuture, Container};
    use crate::agent::shim::Exit;

    /// A container whose exec always ends with the given code.
    struct Fixed(i32);

    impl Container for Fixed {
        fn id(&self) -> String {
            "test://fixed".into()
        }
        fn exit(&mut self) -> Option<Exit> {
            None
        }
        fn signal(&self, _: nix::sys::signal::Signal) {}
        fn release(&self) {}
        fn exec(&self, _: Vec<String>, _: Duration) -> BoxFuture<'static, Result<i32, String>> {
            let code = self.0;
            Box::pin(async move { Ok(code) })
        }
        fn stats(&self) -> BoxFuture<'static, Option<crate::agent::runtime::Stats>> {
            Box::pin(async { None })
        }
    }

    #[tokio::test]
    async fn verdicts_flip_only_after_their_thresholds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = json!({"name": "c", "ports": [{"name": "web", "containerPort": port}],
            "readinessProbe": {"tcpSocket": {"port": "web"}, "periodSeconds": 1, "successThreshold": 2, "failureThreshold": 2}});
        let mut p = Probe::parse(&c, "readinessProbe").unwrap();
        let t0 = Instant::now();
        p.reset(t0);
        assert!(!p.passing, "readiness starts unready");
        assert!(
            !p.run(t0, "127.0.0.1", &Fixed(0)).await,
            "one success is not enough"
        );
        assert!(
            !p.run(t0, "127.0.0.1", &Fixed(0)).await,
            "not due again yet"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert!(p.run(t1, "127.0.0.1", &Fixed(0)).await && p.passing);
        drop(listener);
        let t2 = t1 + Duration::from_secs(1);
        assert!(!p.run(t2, "127.0.0.1", &Fixed(0)).await && p.passing);
        let t3 = t2 + Duration::from_secs(1);
        assert!(p.run(t3, "127.0.0.1", &Fixed(0)).await && !p.passing && p.failed());
        // A liveness probe starts as passing; an exec probe's verdict is its exit code.
        let l = json!({"livenessProbe": {"exec": {"command": ["check"]}, "periodSeconds": 1}});
        let mut live = Probe::parse(&l, "livenessProbe").unwrap();
        live.reset(t0);
        assert!(live.passing);
        live.run(t0, "127.0.0.1", &Fixed(0)).await;
        assert!(live.passing && !live.failed());
        for i in 1..=3 {
            live.run(t0 + Duration::from_secs(i), "127.0.0.1", &Fixed(1))
                .await;
        }
        assert!(!live.passing && live.failed());
    }
}
