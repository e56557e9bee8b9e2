//! Hollow nodes (Kubernetes' kubemark idea): `flotilla agent --hollow N` runs N simulated
//! nodes in one process, each with the agent's own code above the runtime interface (it
//! registers its Node, renews its Lease, lists and watches its pods, runs one worker per
//! pod, reports status), and this runtime below it, which runs nothing: a container is
//! reported running `--hollow-start-ms` after it was started, passes its exec probes, and
//! ends when signalled, or, if its command line is `sleep N` (a Job's pods, in a density
//! run), exits 0 after N seconds. So the control plane sees real agent traffic from thousands of
//! nodes on one machine.
//!
//! Owns the fake containers' state (in memory: a hollow agent that restarts adopts none,
//! and starts its pods again). Invariants: a container is never reported exited before it
//! is signalled; a signal ends it with the code a process killed by that signal has
//! (128 + signal), as the process runtime would report.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::runtime::{BoxFuture, Container, ExecSession, Handle, Runtime, Spec, StartError, Stats};
use super::shim::Exit;

/// The runtime of hollow nodes.
pub struct HollowRuntime {
    start_delay: Duration,
    next_id: AtomicU64,
}

impl HollowRuntime {
    /// Containers report running `start_delay` after they are started.
    pub fn new(start_delay: Duration) -> HollowRuntime {
        HollowRuntime {
            start_delay,
            next_id: AtomicU64::new(1),
        }
    }
}

/// A container that runs nothing.
struct HollowContainer {
    id: u64,
    exit: Mutex<Option<Exit>>,
    /// When a `sleep N` container exits by itself.
    ends_at: Option<std::time::Instant>,
}

/// N of a `sleep N` command line (command and args together), whole seconds.
fn sleep_seconds(spec: &Spec<'_>) -> Option<u64> {
    let argv: Vec<&str> = spec
        .command
        .iter()
        .chain(spec.args.iter())
        .map(String::as_str)
        .collect();
    match argv.as_slice() {
        [cmd, n] if cmd.rsplit('/').next() == Some("sleep") => n.parse().ok(),
        _ => None,
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Container for HollowContainer {
    fn id(&self) -> String {
        format!("hollow://{}", self.id)
    }

    fn exit(&mut self) -> Option<Exit> {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() && self.ends_at.is_some_and(|t| t <= std::time::Instant::now()) {
            *exit = Some(Exit {
                code: 0,
                finished_at: now_secs(),
                oom_killed: false,
            });
        }
        exit.clone()
    }

    fn signal(&self, sig: Signal) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(Exit {
                code: 128 + sig as i32,
                finished_at: now_secs(),
                oom_killed: false,
            });
        }
    }

    fn release(&self) {}

    fn exec(
        &self,
        _argv: Vec<String>,
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<i32, String>> {
        Box::pin(async { Ok(0) })
    }

    fn stats(&self) -> BoxFuture<'static, Option<Stats>> {
        Box::pin(async { None })
    }
}

impl Runtime for HollowRuntime {
    fn version(&self) -> String {
        "hollow://1".into()
    }

    fn start<'a>(&'a self, spec: &'a Spec<'a>) -> BoxFuture<'a, Result<Handle, StartError>> {
        Box::pin(async move {
            tokio::time::sleep(self.start_delay).await;
            let c: Handle = Box::new(HollowContainer {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                exit: Mutex::new(None),
                ends_at: sleep_seconds(spec)
                    .map(|n| std::time::Instant::now() + Duration::from_secs(n)),
            });
            Ok(c)
        })
    }

    fn adopt(&self, _state_dir: &Path, _name: &str) -> Option<Handle> {
        None
    }

    fn adopts(&self) -> bool {
        false
    }

    fn exec<'a>(
        &'a self,
        _state_dir: &'a Path,
        _name: &'a str,
        _argv: Vec<String>,
        _stdin: bool,
    ) -> BoxFuture<'a, Result<ExecSession, String>> {
        Box::pin(async {
            Ok(ExecSession::Finished {
                stdout: Vec::new(),
                stderr: b"a hollow node runs no processes\n".to_vec(),
                code: 0,
            })
        })
    }

    fn remove_pod<'a>(&'a self, state_dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = tokio::fs::remove_dir_all(state_dir).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hollow_container_runs_until_signalled() {
        let mut c = HollowContainer {
            id: 7,
            exit: Mutex::new(None),
            ends_at: None,
        };
        assert_eq!(c.id(), "hollow://7");
        assert!(c.exit().is_none());
        c.signal(Signal::SIGTERM);
        assert_eq!(c.exit().unwrap().code, 143);
        c.signal(Signal::SIGKILL);
        assert_eq!(c.exit().unwrap().code, 143, "the first signal decides");
    }

    #[test]
    fn a_sleeping_container_exits_zero_when_its_time_is_up() {
        let mut c = HollowContainer {
            id: 8,
            exit: Mutex::new(None),
            ends_at: Some(std::time::Instant::now() + Duration::from_secs(3600)),
        };
        assert!(c.exit().is_none());
        c.ends_at = Some(std::time::Instant::now());
        assert_eq!(c.exit().unwrap().code, 0);
        c.signal(Signal::SIGKILL);
        assert_eq!(c.exit().unwrap().code, 0, "it had already ended");
    }
}
