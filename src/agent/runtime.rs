//! The container runtime interface, and the process runtime (the embedded default).
//!
//! A runtime starts one container and hands back a [`Handle`]; the pod worker polls it and
//! signals it. The process runtime runs a container's `command` and `args` as a host process
//! in its own process group (so a signal reaches everything it started), with the given
//! environment only, in `workingDir` or the pod's directory, output appended to a log file.
//! There is no image: a container without `command` cannot start here. Containers share the
//! host's network (the pod IP is the node's).

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
}

/// A started container.
pub struct Handle {
    child: tokio::process::Child,
    /// Process (and process group) id.
    pub pid: u32,
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
        let log = open_log(&spec.log)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {program:?}: {e}"))?;
        let pid = child.id().ok_or("the process exited at once")?;
        Ok(Handle { child, pid })
    }
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
