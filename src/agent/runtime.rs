//! The container runtime interface, and the process runtime (the embedded default).
//!
//! A runtime starts one container and hands back a [`Handle`]; the pod worker polls it and
//! signals it. The process runtime runs a container's `command` and `args` as a host process
//! in its own process group (so a signal reaches everything it started), with the given
//! environment only, in `workingDir` or the pod's directory, output appended to a log file.
//! There is no image: a container without `command` cannot start here. Containers share the
//! host's network (the pod IP is the node's).
//!
//! Output is written in the CRI log format, one line per line of output:
//! `<RFC 3339 time with nanoseconds> <stdout|stderr> F <line>`, which is what lets the agent
//! serve `kubectl logs --timestamps`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// What to start.
pub struct Spec<'a> {
    /// Container name.
    pub name: &'a str,
    /// The program and its arguments (`command` then `args`).
    pub argv: Vec<String>,
    /// The environment, whole.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub dir: PathBuf,
    /// Where stdout and stderr go.
    pub log: PathBuf,
    /// Memory limit, bytes.
    pub memory_limit: Option<u64>,
    /// CPU limit, milli-cores.
    pub cpu_limit: Option<u64>,
    /// The container's cgroup, relative to each controller's root
    /// (`flotilla/<node>/<pod uid>/<container>`), unique per agent and container.
    pub cgroup: String,
}

/// A started container.
pub struct Handle {
    child: tokio::process::Child,
    /// Process (and process group) id.
    pub pid: u32,
    /// The cgroup directories made for it (removed once it has exited).
    cgroups: Vec<PathBuf>,
}

impl Handle {
    /// The exit code once it has exited (128 + signal for a signal).
    pub fn try_wait(&mut self) -> Option<i32> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                Some(
                    status
                        .code()
                        .or_else(|| status.signal().map(|s| 128 + s))
                        .unwrap_or(255),
                )
            }
            Ok(None) => None,
            Err(_) => Some(255),
        }
    }

    /// True if the kernel's OOM killer ended it (its memory cgroup counted a kill).
    pub fn oom_killed(&self) -> bool {
        self.cgroups.iter().any(|d| {
            std::fs::read_to_string(d.join("memory.oom_control"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("oom_kill "))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
                .is_some_and(|n| n > 0)
        })
    }

    /// Removes its cgroups (after it has exited; a cgroup with processes stays).
    pub fn release(&self) {
        for d in &self.cgroups {
            // The container's cgroup, then the pod's, the node's and `flotilla` if empty.
            for dir in d.ancestors().take(4) {
                if std::fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
    }

    /// Sends `sig` to the container's process group.
    pub fn signal(&self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.pid as i32), sig);
    }
}

/// A container runtime.
pub trait Runtime: Send + Sync {
    /// The runtime's name and version, for the Node's `nodeInfo.containerRuntimeVersion`.
    fn version(&self) -> String;
    /// Starts a container.
    fn start(&self, spec: &Spec<'_>) -> Result<Handle, String>;
}

/// Where the cgroup v1 controllers are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

static SH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "/bin/sh".to_string());

/// Containers as host processes.
pub struct ProcessRuntime;

impl Runtime for ProcessRuntime {
    fn version(&self) -> String {
        format!("process://{}", env!("CARGO_PKG_VERSION"))
    }

    fn start(&self, spec: &Spec<'_>) -> Result<Handle, String> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(format!(
                "container {:?} has no command: the process runtime runs commands, not images",
                spec.name
            ));
        };
        std::fs::create_dir_all(&spec.dir).map_err(|e| format!("{}: {e}", spec.dir.display()))?;
        // Limits: a cgroup per controller (v1, as on this machine), entered by the
        // container's first process before it execs the command, so nothing escapes.
        let mut cgroups = Vec::new();
        let mut limits: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
        if let Some(m) = spec.memory_limit {
            limits.push(("memory", vec![("memory.limit_in_bytes", m.to_string())]));
        }
        if let Some(c) = spec.cpu_limit {
            let period = 100_000u64;
            let quota = (c * period / 1000).max(1000);
            limits.push((
                "cpu",
                vec![
                    ("cpu.cfs_period_us", period.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            ));
        }
        for (controller, files) in &limits {
            let dir = Path::new(CGROUP_ROOT).join(controller).join(&spec.cgroup);
            std::fs::create_dir_all(&dir).map_err(|e| {
                format!(
                    "cannot enforce the {controller} limit: {}: {e}",
                    dir.display()
                )
            })?;
            for (file, value) in files {
                std::fs::write(dir.join(file), value)
                    .map_err(|e| format!("cannot enforce the {controller} limit: {file}: {e}"))?;
            }
            cgroups.push(dir);
        }
        let (program, args): (&String, Vec<String>) = if cgroups.is_empty() {
            (program, args.to_vec())
        } else {
            // sh -c 'echo $$ > "$1" && shift && ... exec "$@"' sh <procs files> argv...
            let mut script = String::new();
            for _ in &cgroups {
                script.push_str("echo $$ > \"$1\" && shift && ");
            }
            script.push_str("exec \"$@\"");
            let mut wrapped = vec!["-c".to_string(), script, "sh".to_string()];
            wrapped.extend(
                cgroups
                    .iter()
                    .map(|d| d.join("cgroup.procs").display().to_string()),
            );
            wrapped.push(program.clone());
            wrapped.extend(args.iter().cloned());
            (&SH, wrapped)
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(open_log(&spec.log)?));
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {program:?}: {e}"))?;
        let pid = child.id().ok_or("the process exited at once")?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(copy_lines(out, "stdout", log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(copy_lines(err, "stderr", log));
        }
        Ok(Handle {
            child,
            pid,
            cgroups,
        })
    }
}

/// Copies `from` line by line into the log in the CRI format (a line longer than 16 KiB is
/// split into partial lines, marked `P`).
async fn copy_lines(
    from: impl tokio::io::AsyncRead + Unpin,
    stream: &'static str,
    log: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
) {
    use std::io::Write;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    const MAX_LINE: usize = 16 * 1024;
    let mut reader = tokio::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let full = line.last() == Some(&b'\n');
        if full {
            line.pop();
        }
        let tag = if full || n < MAX_LINE { "F" } else { "P" };
        let mut entry = format!("{} {stream} {tag} ", timestamp()).into_bytes();
        entry.extend_from_slice(&line);
        entry.push(b'\n');
        let mut f = log.lock().expect("not poisoned");
        if f.write_all(&entry).is_err() {
            return;
        }
    }
}

/// Now, as RFC 3339 with nanoseconds.
pub fn timestamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let base = crate::api::meta::rfc3339(d.as_secs());
    format!("{}.{:09}Z", base.trim_end_matches('Z'), d.subsec_nanos())
}

fn open_log(path: &Path) -> Result<std::fs::File, String> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}
