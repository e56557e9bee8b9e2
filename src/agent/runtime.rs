//! The container runtime interface, and the process runtime (the embedded default).
//!
//! A runtime starts one container and hands back a [`Handle`]; the pod worker polls it and
//! signals it. The process runtime runs a container's `command` and `args` as a host process
//! in its own process group (so a signal reaches everything it started), with the given
//! environment only, in `workingDir` or the pod's directory. There is no image: a container
//! without `command` cannot start here. Containers share the host's network (the pod IP is
//! the node's).
//!
//! Each container runs under a `flotilla-shim` ([`super::shim`]), not under the agent, so
//! the agent can die and come back: [`Runtime::adopt`] finds the container again from the
//! files in the pod's directory. Per container `c` the pod directory holds `c.pid` (written
//! by the shim), `c.exit` (written by the shim when it ends) and `c.container` (the
//! [`Record`], written by the runtime once the shim reports the container started). A
//! process is only taken for the container if its start time matches the record, so a
//! recycled pid is never signalled.
//!
//! Output is written in the CRI log format, one line per line of output:
//! `<RFC 3339 time with nanoseconds> <stdout|stderr> F <line>`, which is what lets the agent
//! serve `kubectl logs --timestamps` and `--since`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::shim::{write_whole, Exit, ShimSpec};

/// A volume mounted into a container.
#[derive(Debug, Clone)]
pub struct Mount {
    /// The volume (or the directory inside it, for a `subPath`) on the host.
    pub host_path: PathBuf,
    /// Where the container sees it.
    pub container_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The pod a container belongs to.
#[derive(Debug, Clone, Default)]
pub struct PodRef {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its uid.
    pub uid: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// `spec.hostNetwork`: the pod shares the node's network namespace.
    pub host_network: bool,
    /// Its hostname (`spec.hostname`, else its name), for a pod with a network of its own.
    pub hostname: String,
}

/// What a pod's sandbox is made from: the parts of a [`Spec`] that belong to the pod, not
/// to one container.
pub struct Sandbox<'a> {
    /// The pod.
    pub pod: &'a PodRef,
    /// The pod's directory.
    pub state_dir: &'a Path,
    /// The pod's cgroup, relative to each controller's root (`flotilla/<node>/<pod uid>`).
    pub cgroup: String,
    /// The pod's process limit.
    pub pids_limit: Option<u64>,
    /// The pod's resolver configuration, when it is not the host's.
    pub dns: Option<&'a super::dns::PodDns>,
}

/// What to start.
pub struct Spec<'a> {
    /// Container name.
    pub name: &'a str,
    /// The pod it belongs to.
    pub pod: PodRef,
    /// Its image (unused by the process runtime) and `imagePullPolicy`.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub pull_policy: String,
    /// `command` (replaces the image's entrypoint).
    pub command: Vec<String>,
    /// `args` (replace the image's command).
    pub args: Vec<String>,
    /// The environment, whole.
    pub env: Vec<(String, String)>,
    /// The container's root directory on the host (the process runtime has no image: a
    /// container's paths are under it).
    pub root: PathBuf,
    /// `workingDir`, a container path.
    pub working_dir: Option<String>,
    /// Its volumes.
    pub mounts: Vec<Mount>,
    /// The pod's directory, where the runtime keeps what it needs to find the container
    /// again, and where logs go.
    pub state_dir: PathBuf,
    /// Where stdout and stderr go (under `state_dir`).
    pub log: PathBuf,
    /// The log's size bound (it is rotated past it).
    pub log_max_bytes: u64,
    /// How many times it ran before.
    pub attempt: u32,
    /// Memory limit, bytes.
    pub memory_limit: Option<u64>,
    /// CPU limit, milli-cores.
    pub cpu_limit: Option<u64>,
    /// The pod's process limit (all its containers together), as the kubelet's
    /// `podPidsLimit`.
    pub pod_pids_limit: Option<u64>,
    /// The container's cgroup, relative to each controller's root
    /// (`flotilla/<node>/<pod uid>/<container>`), unique per agent and container.
    pub cgroup: String,
    /// The pod's resolver configuration, when it is not the host's.
    pub dns: Option<super::dns::PodDns>,
}

impl Spec<'_> {
    /// The pod-level part of the spec.
    pub fn sandbox(&self) -> Sandbox<'_> {
        Sandbox {
            pod: &self.pod,
            state_dir: &self.state_dir,
            cgroup: self
                .cgroup
                .rsplit_once('/')
                .map_or("", |(p, _)| p)
                .to_string(),
            pids_limit: self.pod_pids_limit,
            dns: self.dns.as_ref(),
        }
    }

    /// Where a container path lies on the host under the process runtime.
    pub fn host_dir(&self) -> PathBuf {
        match &self.working_dir {
            Some(w) => super::volumes::under(&self.root, w),
            None => self.root.clone(),
        }
    }
}

/// What the runtime remembers of a started container, to adopt it after an agent restart.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    pid: u32,
    pid_start: u64,
    shim_pid: u32,
    shim_start: u64,
    cgroups: Vec<PathBuf>,
    /// The environment and directory exec probes run with.
    env: Vec<(String, String)>,
    dir: PathBuf,
    /// It runs in a mount namespace of its own (the pod's resolv.conf), which commands
    /// executed in it enter.
    #[serde(default)]
    private_mounts: bool,
}

/// `argv` run in the mount namespace of process `pid` when it has one of its own
/// (`nsenter` from util-linux), so `kubectl exec` and exec probes see what the container
/// sees (its `/etc/resolv.conf`).
fn in_mounts(pid: u32, private: bool, argv: Vec<String>) -> Vec<String> {
    if !private {
        return argv;
    }
    let mut out = vec![
        "nsenter".to_string(),
        format!("--mount=/proc/{pid}/ns/mnt"),
        "--".to_string(),
    ];
    out.extend(argv);
    out
}

/// Why a container could not start: the waiting reason Kubernetes shows
/// (`CreateContainerConfigError`, `ErrImagePull`, `CreateContainerError`, ...) and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct StartError {
    /// The waiting reason.
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
}

impl StartError {
    /// A configuration error (`CreateContainerConfigError`).
    pub fn config(message: impl Into<String>) -> StartError {
        StartError {
            reason: "CreateContainerConfigError",
            message: message.into(),
        }
    }
}

/// A started container, as the pod worker sees it whatever the runtime.
pub trait Container: Send + Sync {
    /// Its container ID as the pod status shows it (`process://<pid>`, `containerd://<id>`).
    fn id(&self) -> String;
    /// How it ended, once it has.
    fn exit(&mut self) -> Option<Exit>;
    /// Sends `sig` to it (SIGTERM to ask it to stop, SIGKILL to end it).
    fn signal(&self, sig: Signal);
    /// Frees what was made for it (after it has exited).
    fn release(&self);
    /// Runs `argv` in it (exec probes), returning the exit code, within `timeout`.
    fn exec(&self, argv: Vec<String>, timeout: Duration)
        -> BoxFuture<'static, Result<i32, String>>;
    /// What it uses now (`None` if the runtime cannot tell).
    fn stats(&self) -> BoxFuture<'static, Option<Stats>>;
}

/// A container's resource use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// CPU time used since it started, seconds.
    pub cpu_seconds: f64,
    /// Memory working set: usage less inactive file pages, bytes.
    pub memory_bytes: u64,
}

/// A cgroup v1 memory controller's working set (`memory.usage_in_bytes` less
/// `total_inactive_file`, as the kubelet counts it).
fn working_set(dir: &Path) -> Option<u64> {
    let usage: u64 = std::fs::read_to_string(dir.join("memory.usage_in_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let inactive = std::fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("total_inactive_file "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(usage.saturating_sub(inactive))
}

/// The CPU seconds (its own and its waited-for children's) and resident bytes of `pid`.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<u64>().ok())
        .sum();
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    // 100 ticks a second and 4 KiB pages on Linux here.
    Some((ticks as f64 / 100.0, rss_pages * 4096))
}

/// A started container.
pub type Handle = Box<dyn Container>;

impl dyn Container {
    /// The exit code once it has exited (128 + signal for a signal).
    pub fn try_wait(&mut self) -> Option<i32> {
        self.exit().map(|e| e.code)
    }

    /// True if the kernel's OOM killer ended it.
    pub fn oom_killed(&mut self) -> bool {
        self.exit().is_some_and(|e| e.oom_killed)
    }
}

/// A container of the process runtime: a process group under a shim.
struct ProcessContainer {
    /// Process (and process group) id.
    pid: u32,
    pid_start: u64,
    shim_pid: u32,
    shim_start: u64,
    /// The shim, when this agent started it (so it is reaped).
    shim: Option<tokio::process::Child>,
    exit_file: PathBuf,
    exit: Option<Exit>,
    /// The cgroup directories made for it (removed once it has exited).
    cgroups: Vec<PathBuf>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    private_mounts: bool,
}

/// The start time (clock ticks since boot) of live, non-zombie process `pid`.
fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn read_exit(path: &Path) -> Option<Exit> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

impl ProcessContainer {
    fn poll_exit(&mut self) -> Option<Exit> {
        if let Some(e) = read_exit(&self.exit_file) {
            if let Some(shim) = self.shim.as_mut() {
                let _ = shim.try_wait();
            }
            return Some(e);
        }
        let shim_gone = match self.shim.as_mut() {
            Some(shim) => !matches!(shim.try_wait(), Ok(None)),
            None => proc_start(self.shim_pid) != Some(self.shim_start),
        };
        if !shim_gone {
            return None;
        }
        // The shim may have written the exit file just before it went.
        if let Some(e) = read_exit(&self.exit_file) {
            return Some(e);
        }
        // The shim was killed: the container is no longer supervised, so it goes too.
        if proc_start(self.pid) == Some(self.pid_start) {
            let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        Some(Exit {
            code: 255,
            finished_at: crate::api::meta::now_secs(),
            oom_killed: false,
        })
    }
}

impl Container for ProcessContainer {
    fn id(&self) -> String {
        format!("process://{}", self.pid)
    }

    fn exit(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            self.exit = self.poll_exit();
        }
        self.exit.clone()
    }

    fn release(&self) {
        remove_cgroups(&self.cgroups);
    }

    fn signal(&self, sig: Signal) {
        if self.exit.is_none() && proc_start(self.pid) == Some(self.pid_start) {
            let _ = killpg(Pid::from_raw(self.pid as i32), sig);
        }
    }

    fn stats(&self) -> BoxFuture<'static, Option<Stats>> {
        // CPU from the main process and the children it waited for; memory from the
        // container's memory cgroup when it has one, else the main process's resident set.
        let usage = (proc_start(self.pid) == Some(self.pid_start))
            .then(|| proc_usage(self.pid))
            .flatten();
        let memory_cgroup = self
            .cgroups
            .iter()
            .find(|d| d.starts_with(Path::new(CGROUP_ROOT).join("memory")))
            .and_then(|d| working_set(d));
        let stats = usage.map(|(cpu, rss)| Stats {
            cpu_seconds: cpu,
            memory_bytes: memory_cgroup.unwrap_or(rss),
        });
        Box::pin(async move { stats })
    }

    fn exec(
        &self,
        argv: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<i32, String>> {
        let (env, dir) = (self.env.clone(), self.dir.clone());
        let argv = if argv.is_empty() {
            argv
        } else {
            in_mounts(self.pid, self.private_mounts, argv)
        };
        Box::pin(async move {
            let Some((program, args)) = argv.split_first() else {
                return Err("an empty command".to_string());
            };
            let run = tokio::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(timeout, run).await {
                Ok(Ok(s)) => Ok(s.code().unwrap_or(255)),
                Ok(Err(e)) => Err(format!("{program}: {e}")),
                Err(_) => Err(format!("timed out after {timeout:?}")),
            }
        })
    }
}

/// Finds `program` as `execvp` would (a name without `/` on the environment's `PATH`, a path
/// relative to `dir`); the error is runc's.
fn executable(program: &str, env: &[(String, String)], dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        Some(dir.join(program)).filter(|p| runnable(p))
    } else {
        env.iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
            .split(':')
            .map(|d| dir.join(d).join(program))
            .find(|p| runnable(p))
    };
    found.map(|_| ()).ok_or_else(|| {
        format!("exec: {program:?}: stat {program}: no such file or directory (or not executable)")
    })
}

/// `argv` made to enter `cgroups` first: its first process writes itself into each one's
/// `cgroup.procs` before it execs the command, so nothing it starts escapes them
/// (`sh -c 'echo $$ > "$1" && shift && ... exec "$@"' sh <procs files> argv...`).
fn in_cgroups(cgroups: &[PathBuf], argv: Vec<String>) -> Vec<String> {
    if cgroups.is_empty() {
        return argv;
    }
    let mut script = "echo $$ > \"$1\" && shift && ".repeat(cgroups.len());
    script.push_str("exec \"$@\"");
    let mut wrapped = vec!["/bin/sh".into(), "-c".into(), script, "sh".into()];
    wrapped.extend(
        cgroups
            .iter()
            .map(|d| d.join("cgroup.procs").display().to_string()),
    );
    wrapped.extend(argv);
    wrapped
}

fn remove_cgroups(cgroups: &[PathBuf]) {
    for d in cgroups {
        // The container's cgroup, then the pod's, the node's and `flotilla` if empty.
        for dir in d.ancestors().take(4) {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// A command started in a container by `kubectl exec`.
pub enum ExecSession {
    /// Running, its streams piped (stdin only if asked for).
    Process(tokio::process::Child),
    /// Already done (a runtime that only runs commands to the end): its output and code.
    Finished {
        /// What it wrote to stdout.
        stdout: Vec<u8>,
        /// What it wrote to stderr.
        stderr: Vec<u8>,
        /// Its exit code.
        code: i32,
    },
}

/// A boxed future, for the object-safe [`Runtime`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A container runtime.
pub trait Runtime: Send + Sync {
    /// The runtime's name and version, for the Node's `nodeInfo.containerRuntimeVersion`.
    fn version(&self) -> String;
    /// Starts a container.
    fn start<'a>(&'a self, spec: &'a Spec<'a>) -> BoxFuture<'a, Result<Handle, StartError>>;
    /// The container `name` that an earlier run of the agent started for the pod whose
    /// directory is `state_dir`, running or ended; `None` if there is none.
    fn adopt(&self, state_dir: &Path, name: &str) -> Option<Handle>;
    /// False if [`Runtime::adopt`] never finds anything (its containers do not outlive the
    /// agent): then the agent keeps no restart record for them either.
    fn adopts(&self) -> bool {
        true
    }
    /// Starts `argv` in the running container `name` of the pod whose directory is
    /// `state_dir` (`kubectl exec`), with a stdin stream if `stdin`.
    fn exec<'a>(
        &'a self,
        state_dir: &'a Path,
        name: &'a str,
        argv: Vec<String>,
        stdin: bool,
    ) -> BoxFuture<'a, Result<ExecSession, String>>;
    /// Stops whatever still runs for the pod whose directory is `state_dir` (SIGKILL), and
    /// removes what the runtime made for it: its cgroups, sandbox and the directory.
    fn remove_pod<'a>(&'a self, state_dir: &'a Path) -> BoxFuture<'a, ()>;
    /// Whether this runtime gives a pod that is not `hostNetwork` a network of its own (and
    /// so its address, from [`Runtime::prepare_pod`]).
    fn pod_network(&self) -> bool {
        false
    }
    /// Makes the pod's sandbox ready before its first container starts, and returns the
    /// pod's address when the runtime gave it one (a pod network); `None`: the agent's.
    fn prepare_pod<'a>(
        &'a self,
        _sandbox: &'a Sandbox<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, StartError>> {
        Box::pin(async { Ok(None) })
    }
}

/// Where the cgroup v1 controllers are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Containers as host processes, each under a shim.
pub struct ProcessRuntime {
    /// The shim: `flotilla-shim` beside the running executable, else the executable itself
    /// as `flotilla shim`.
    shim: Vec<std::ffi::OsString>,
}

impl ProcessRuntime {
    /// The process runtime, starting shims from beside the running executable.
    pub fn new() -> std::io::Result<ProcessRuntime> {
        let exe = std::env::current_exe()?;
        let small = exe.with_file_name("flotilla-shim");
        let shim = if small.is_file() {
            vec![small.into_os_string()]
        } else {
            vec![exe.into_os_string(), "shim".into()]
        };
        Ok(ProcessRuntime { shim })
    }
}

fn files(state_dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        state_dir.join(format!("{name}.pid")),
        state_dir.join(format!("{name}.exit")),
        state_dir.join(format!("{name}.container")),
    )
}

impl Runtime for ProcessRuntime {
    fn version(&self) -> String {
        format!("process://{}", env!("CARGO_PKG_VERSION"))
    }

    fn start<'a>(&'a self, spec: &'a Spec<'a>) -> BoxFuture<'a, Result<Handle, StartError>> {
        Box::pin(async move {
            // What the spec itself gets wrong is a configuration error; what goes wrong
            // starting it is a run error, as the kubelet tells them apart.
            if spec.command.is_empty() {
                return Err(StartError::config(format!(
                    "container {:?} has no command: the process runtime runs commands, not images",
                    spec.name
                )));
            }
            super::volumes::link(&spec.root, &spec.mounts).map_err(StartError::config)?;
            self.start_container(spec)
                .await
                .map(|c| Box::new(c) as Handle)
                .map_err(|message| StartError {
                    reason: "RunContainerError",
                    message,
                })
        })
    }

    fn adopt(&self, state_dir: &Path, name: &str) -> Option<Handle> {
        let (_, exit_file, record_file) = files(state_dir, name);
        let r: Record = serde_json::from_slice(&std::fs::read(record_file).ok()?).ok()?;
        let mut h = ProcessContainer {
            pid: r.pid,
            pid_start: r.pid_start,
            shim_pid: r.shim_pid,
            shim_start: r.shim_start,
            shim: None,
            exit_file,
            exit: None,
            cgroups: r.cgroups,
            env: r.env,
            dir: r.dir,
            private_mounts: r.private_mounts,
        };
        h.exit();
        Some(Box::new(h))
    }

    fn exec<'a>(
        &'a self,
        state_dir: &'a Path,
        name: &'a str,
        argv: Vec<String>,
        stdin: bool,
    ) -> BoxFuture<'a, Result<ExecSession, String>> {
        Box::pin(async move {
            let (_, exit_file, record_file) = files(state_dir, name);
            let r: Record = std::fs::read(&record_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| format!("container {name:?} has not started"))?;
            if exit_file.exists() || proc_start(r.pid) != Some(r.pid_start) {
                return Err(format!("container {name:?} is not running"));
            }
            if argv.is_empty() {
                return Err("no command".into());
            }
            // In the container's environment, directory, mounts and cgroups.
            let argv = in_cgroups(&r.cgroups, in_mounts(r.pid, r.private_mounts, argv));
            let (program, args) = argv.split_first().expect("not empty");
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env_clear()
                .envs(r.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .current_dir(&r.dir)
                .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let child = cmd.spawn().map_err(|e| format!("exec {program:?}: {e}"))?;
            Ok(ExecSession::Process(child))
        })
    }

    fn remove_pod<'a>(&'a self, state_dir: &'a Path) -> BoxFuture<'a, ()> {
        let dir = state_dir.to_path_buf();
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || remove_process_pod(&dir)).await;
        })
    }
}

/// Kills what is left of a process-runtime pod and removes its cgroups and directory.
fn remove_process_pod(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    let mut cgroups = Vec::new();
    let mut shims = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("container") {
            continue;
        }
        let Some(r) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        else {
            continue;
        };
        if proc_start(r.pid) == Some(r.pid_start) {
            let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
        }
        cgroups.extend(r.cgroups);
        shims.push((r.shim_pid, r.shim_start));
    }
    // The shims record the exits and go; the cgroups empty as the processes die (on a busy
    // machine that took over a second: allow five). The directory goes only once the shims
    // have: one writing its exit file into it would otherwise keep it.
    for _ in 0..250 {
        remove_cgroups(&cgroups);
        let shims_gone = shims
            .iter()
            .all(|(pid, start)| proc_start(*pid) != Some(*start));
        if shims_gone && cgroups.iter().all(|d| !d.exists()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(state_dir);
}

impl ProcessRuntime {
    async fn start_container(&self, spec: &Spec<'_>) -> Result<ProcessContainer, String> {
        let argv: Vec<String> = spec.command.iter().chain(&spec.args).cloned().collect();
        let dir = spec.host_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Checked here, before any cgroup wrapper: otherwise whether a missing program is
        // a start error or an exit of 127 would depend on whether the container has limits.
        executable(&argv[0], &spec.env, &dir)?;
        std::fs::create_dir_all(&spec.state_dir)
            .map_err(|e| format!("{}: {e}", spec.state_dir.display()))?;
        let (pid_file, exit_file, record_file) = files(&spec.state_dir, spec.name);
        for f in [&pid_file, &exit_file, &record_file] {
            let _ = std::fs::remove_file(f);
        }
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
        if let Some(n) = spec.pod_pids_limit {
            // On the pod's cgroup, so the limit counts every container of the pod.
            limits.push(("pids", vec![("../pids.max", n.to_string())]));
        }
        for (controller, files) in &limits {
            let dir = Path::new(CGROUP_ROOT).join(controller).join(&spec.cgroup);
            let made = std::fs::create_dir_all(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))
                .and_then(|()| {
                    files.iter().try_for_each(|(file, value)| {
                        std::fs::write(dir.join(file), value).map_err(|e| format!("{file}: {e}"))
                    })
                });
            if let Err(e) = made {
                remove_cgroups(&cgroups);
                remove_cgroups(std::slice::from_ref(&dir));
                return Err(format!("cannot enforce the {controller} limit: {e}"));
            }
            cgroups.push(dir);
        }
        let memory_cgroup = spec
            .memory_limit
            .and_then(|_| cgroups.first().cloned())
            .filter(|d| d.starts_with(Path::new(CGROUP_ROOT).join("memory")));
        let argv = in_cgroups(&cgroups, argv);
        // The pod's resolv.conf, which the shim mounts over /etc/resolv.conf in a mount
        // namespace of the container's own (as root; otherwise the host's stays).
        let resolv_conf = match &spec.dns {
            Some(d) if nix::unistd::geteuid().is_root() => {
                let file = spec.state_dir.join("resolv.conf");
                if let Err(e) = std::fs::write(&file, d.render()) {
                    remove_cgroups(&cgroups);
                    return Err(format!("{}: {e}", file.display()));
                }
                Some(file)
            }
            _ => None,
        };
        let shim_spec = ShimSpec {
            resolv_conf,
            argv,
            env: spec.env.clone(),
            dir: dir.clone(),
            log: spec.log.clone(),
            log_max_bytes: spec.log_max_bytes,
            pid_file,
            exit_file: exit_file.clone(),
            memory_cgroup,
        };
        let result = self.spawn_shim(spec, &shim_spec).await;
        let (shim, pid) = match result {
            Ok(x) => x,
            Err(e) => {
                remove_cgroups(&cgroups);
                return Err(e);
            }
        };
        let shim_pid = shim.id().unwrap_or(0);
        let record = Record {
            pid,
            pid_start: proc_start(pid).unwrap_or(0),
            shim_pid,
            shim_start: proc_start(shim_pid).unwrap_or(0),
            cgroups: cgroups.clone(),
            env: spec.env.clone(),
            dir,
            private_mounts: shim_spec.resolv_conf.is_some(),
        };
        let bytes = serde_json::to_vec(&record).expect("a record serializes");
        if let Err(e) = write_whole(&record_file, &bytes) {
            // Not findable after a restart: better not run at all.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(format!("{}: {e}", record_file.display()));
        }
        Ok(ProcessContainer {
            pid,
            pid_start: record.pid_start,
            shim_pid,
            shim_start: record.shim_start,
            shim: Some(shim),
            exit_file,
            exit: None,
            cgroups,
            env: record.env,
            dir: record.dir,
            private_mounts: record.private_mounts,
        })
    }

    /// Starts the shim and waits (bounded) for it to report the container's pid.
    async fn spawn_shim(
        &self,
        spec: &Spec<'_>,
        shim_spec: &ShimSpec,
    ) -> Result<(tokio::process::Child, u32), String> {
        use tokio::io::AsyncBufReadExt;
        let spec_file = spec.state_dir.join(format!("{}.spec", spec.name));
        write_whole(
            &spec_file,
            &serde_json::to_vec(shim_spec).expect("a spec serializes"),
        )
        .map_err(|e| format!("{}: {e}", spec_file.display()))?;
        let mut shim = tokio::process::Command::new(&self.shim[0])
            .args(&self.shim[1..])
            .arg(&spec_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("starting the shim {:?}: {e}", self.shim[0]))?;
        let out = shim.stdout.take().expect("piped");
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::BufReader::new(out).read_line(&mut line),
        )
        .await;
        let _ = std::fs::remove_file(&spec_file);
        if let Some(pid) = line
            .trim()
            .strip_prefix("pid ")
            .and_then(|p| p.parse::<u32>().ok())
        {
            return Ok((shim, pid));
        }
        let _ = shim.start_kill();
        let _ = shim.wait().await;
        Err(match (read, line.trim().strip_prefix("error: ")) {
            (_, Some(why)) => why.to_string(),
            (Err(_), _) => "the shim did not report within 10 s".to_string(),
            _ => format!("the shim failed: {:?}", line.trim()),
        })
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
