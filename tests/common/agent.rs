//! A `flotilla agent` (process runtime) started by a test, and everything it leaves
//! behind removed when the test ends, however it ends.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::Cluster;

/// Kills the agent when the test ends, however it ends, and with it whatever its pods left:
/// their processes (from the agent's pid files) and their cgroups.
pub struct Agent(pub Child, pub std::path::PathBuf, pub &'static str);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let pods = std::fs::read_dir(self.1.join("pods"))
            .into_iter()
            .flatten()
            .flatten();
        for pod in pods {
            for f in std::fs::read_dir(pod.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().extension().is_some_and(|e| e == "pid") {
                    if let Some(pid) = std::fs::read_to_string(f.path())
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for controller in ["memory", "cpu", "pids"] {
            let node = std::path::PathBuf::from(format!(
                "/sys/fs/cgroup/{controller}/flotilla/{}",
                self.2
            ));
            for pod in std::fs::read_dir(&node).into_iter().flatten().flatten() {
                for c in std::fs::read_dir(pod.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if c.path().is_dir() {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
                let _ = std::fs::remove_dir(pod.path());
            }
            let _ = std::fs::remove_dir(&node);
            let _ = std::fs::remove_dir(node.parent().unwrap());
        }
    }
}

impl Agent {
    /// `kill -9` of the agent alone: its pods' processes (under their shims) live on.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Starts `flotilla agent` for node `node` against every replica of `c`, with data in
    /// `data`, a 1 s heartbeat and `extra` flags; its log goes to `<node>.log` beside it.
    pub fn start(c: &Cluster, node: &'static str, data: &std::path::Path, extra: &[&str]) -> Agent {
        let servers: Vec<String> = (1..=3).map(|i| c.replica(i).api()).collect();
        let log = std::fs::File::create(c.dir.path().join(format!("{node}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["agent", "--servers", &servers.join(",")])
            .args(["--node-name", node, "--heartbeat-seconds", "1"])
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the agent starts");
        Agent(child, data.to_path_buf(), node)
    }
}
