//! `flotilla shim`: the supervisor of one container under the process runtime (the role
//! containerd's shim plays for runc).
//!
//! The agent starts one shim per container start, in its own process group; the shim starts
//! the container in another process group, copies its output into the CRI-format log (with
//! rotation), waits for it, and records how it ended. Because the container is the shim's
//! child and not the agent's, the agent can die and restart: the container keeps running,
//! its output keeps being logged, and its exit is still recorded, so the restarted agent
//! re-adopts it instead of starting it twice.
//!
//! Owns, for its one container: the log file (and its one rotated predecessor), the pid
//! file and the exit file. Invariants:
//! - the pid file and the exit file are written whole (temporary file, then rename), so a
//!   reader never sees half of one;
//! - the exit file is written once, after the container's main process has exited and its
//!   process group has been killed (a container's leftovers die with it, as in a pod
//!   sandbox);
//! - the log never exceeds its bound: past `log_max_bytes` the file is rotated to `.1`
//!   (replacing the previous one), so one container run holds at most twice the bound.

use std::io::{BufRead, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the agent asks a shim to run (written to a file only the shim reads, mode 0600).
#[derive(Debug, Serialize, Deserialize)]
pub struct ShimSpec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The environment, whole.
    pub env: Vec<(String, String)>,
    /// The working directory.
    pub dir: PathBuf,
    /// The CRI-format log file.
    pub log: PathBuf,
    /// Rotate the log past this size.
    pub log_max_bytes: u64,
    /// Where the container's pid goes.
    pub pid_file: PathBuf,
    /// Where its exit goes.
    pub exit_file: PathBuf,
    /// Its memory cgroup, to tell an OOM kill from another SIGKILL.
    pub memory_cgroup: Option<PathBuf>,
    /// A file the container sees as `/etc/resolv.conf` (in a mount namespace of its own).
    #[serde(default)]
    pub resolv_conf: Option<PathBuf>,
}

/// Enters a mount namespace of its own (mounts from the host still propagate into it) in
/// which `file` is `/etc/resolv.conf`; the container, started next, inherits it. The shim is
/// single-threaded here, as `unshare` needs.
fn private_resolv_conf(file: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("making / a slave mount: {e}"))?;
    mount(
        Some(file),
        "/etc/resolv.conf",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("mounting {} on /etc/resolv.conf: {e}", file.display()))
}

/// How a container ended (the exit file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Exit {
    /// Its exit code (128 + signal for a signal).
    pub code: i32,
    /// When, in epoch seconds.
    pub finished_at: u64,
    /// Whether the kernel's OOM killer ended it.
    pub oom_killed: bool,
}

/// Writes `bytes` to `path` whole, mode 0600: a temporary file beside it (named after the whole file
/// name: `c.pid` and `c.exit` must not share one, as the shim and the agent write them at
/// the same time), then a rename.
pub fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // Readable by the agent (root) only: records hold the container's environment, which
    // may hold Secrets.
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Runs the shim for the spec at `spec_path` (which it removes once read). It prints
/// `pid <n>` or `error: <why>` on stdout for the agent, then supervises the container.
/// Returns the shim's exit code.
pub fn run(spec_path: &Path) -> i32 {
    let mut out = std::io::stdout();
    let spec: ShimSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(out, "error: reading {}: {e}", spec_path.display());
            return 1;
        }
    };
    let _ = std::fs::remove_file(spec_path);
    let log = match LogWriter::open(&spec.log, spec.log_max_bytes) {
        Ok(l) => Arc::new(Mutex::new(l)),
        Err(e) => {
            let _ = writeln!(out, "error: {}: {e}", spec.log.display());
            return 1;
        }
    };
    let Some((program, args)) = spec.argv.split_first() else {
        let _ = writeln!(out, "error: no command");
        return 1;
    };
    if let Some(file) = &spec.resolv_conf {
        if let Err(e) = private_resolv_conf(file) {
            let _ = writeln!(out, "error: the pod's resolv.conf: {e}");
            return 1;
        }
    }
    let mut child = match std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "error: starting {program:?}: {e}");
            return 1;
        }
    };
    let pid = child.id();
    if let Err(e) = write_whole(&spec.pid_file, pid.to_string().as_bytes()) {
        let _ = child.kill();
        let _ = child.wait();
        let _ = writeln!(out, "error: {}: {e}", spec.pid_file.display());
        return 1;
    }
    let _ = writeln!(out, "pid {pid}");
    let _ = out.flush();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut copiers = 0;
    if let Some(o) = child.stdout.take() {
        copiers += 1;
        let (log, done) = (log.clone(), done_tx.clone());
        std::thread::spawn(move || {
            copy_lines(o, "stdout", &log);
            let _ = done.send(());
        });
    }
    if let Some(e) = child.stderr.take() {
        copiers += 1;
        let (log, done) = (log.clone(), done_tx.clone());
        std::thread::spawn(move || {
            copy_lines(e, "stderr", &log);
            let _ = done.send(());
        });
    }
    let status = child.wait();
    // What the main process left behind in its group goes with it.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    // The last output is logged before the exit is recorded (bounded: a process that
    // left the group may hold the pipe open forever).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for _ in 0..copiers {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code()
                .or_else(|| s.signal().map(|n| 128 + n))
                .unwrap_or(255)
        }
        Err(_) => 255,
    };
    let exit = Exit {
        code,
        finished_at: crate::api::meta::now_secs(),
        oom_killed: spec.memory_cgroup.as_deref().is_some_and(oom_killed),
    };
    let bytes = serde_json::to_vec(&exit).expect("an exit serializes");
    match write_whole(&spec.exit_file, &bytes) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// True if the memory cgroup at `dir` counted an OOM kill.
pub fn oom_killed(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("memory.oom_control"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .is_some_and(|n| n > 0)
}

/// An append-only CRI-format log with size-bounded rotation.
struct LogWriter {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max: u64,
}

impl LogWriter {
    fn open(path: &Path, max: u64) -> std::io::Result<LogWriter> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            size,
            max: max.max(4096),
        })
    }

    fn write(&mut self, entry: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + entry.len() as u64 > self.max {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, &rotated)?;
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        self.file.write_all(entry)?;
        self.size += entry.len() as u64;
        Ok(())
    }
}

/// Copies `from` line by line into the log in the CRI format (a line longer than 16 KiB is
/// split into partial lines, marked `P`).
fn copy_lines(from: impl Read, stream: &'static str, log: &Mutex<LogWriter>) {
    const MAX_LINE: usize = 16 * 1024;
    let mut reader = std::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let full = line.last() == Some(&b'\n');
        if full {
            line.pop();
        }
        let tag = if full || n < MAX_LINE { "F" } else { "P" };
        let mut entry = format!("{} {stream} {tag} ", super::runtime::timestamp()).into_bytes();
        entry.extend_from_slice(&line);
        entry.push(b'\n');
        let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
        if f.write(&entry).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_written_whole_at_once_do_not_share_a_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("c.pid"), dir.path().join("c.exit"));
        // One writer per file, as the shim (pid, exit) and the agent (record) are.
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..2000 {
                    write_whole(&a, b"1").unwrap();
                }
            });
            s.spawn(|| {
                for _ in 0..2000 {
                    write_whole(&b, b"2").unwrap();
                }
            });
        });
        assert_eq!(std::fs::read(&a).unwrap(), b"1");
        assert_eq!(std::fs::read(&b).unwrap(), b"2");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "records may hold Secrets");
    }

    #[test]
    fn the_log_rotates_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut w = LogWriter::open(&path, 4096).unwrap();
        let entry = vec![b'x'; 1000];
        for _ in 0..9 {
            w.write(&entry).unwrap();
        }
        let current = std::fs::metadata(&path).unwrap().len();
        let rotated = std::fs::metadata(dir.path().join("0.log.1")).unwrap().len();
        assert!(current <= 4096 && rotated <= 4096, "{current} {rotated}");
        assert_eq!(current + rotated, 9000 - 4000, "one rotation was dropped");
    }
}
