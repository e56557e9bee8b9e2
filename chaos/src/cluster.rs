//! A three-replica Flotilla cluster of real processes that the nemesis can hurt.
//!
//! Owns the replica processes, their data directories and logs under the run's output
//! folder. Replicas listen on their own loopback addresses (`127.a.b.1`–`.3`, a free
//! prefix), so a replica's address is its identity. Invariant: a replica slot has at most
//! one process; every process is killed when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla::client::Client;
use flotilla::gateway::json::{MemberListResponse, StatusResponse};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;

/// Size of each replica's tmpfs when disk faults are on.
const TMPFS_MIB: u64 = 256;
/// Debian's libfaketime (package `faketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

const API_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// One replica slot.
pub struct Replica {
    /// Its Raft id (1-based).
    pub id: u64,
    /// Its loopback address.
    pub ip: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Runs under libfaketime with this wall-clock offset.
    skew: Option<String>,
    /// Its data directory is a tmpfs mounted by this cluster.
    mounted: bool,
    /// A filler file that exhausts its tmpfs.
    filler: Option<PathBuf>,
    /// Rejoined as a new member: started with `--join` from then on.
    joined: bool,
    /// Its network namespace (`--network netns`).
    ns: Option<String>,
}

impl Replica {
    /// `host:port` of its API.
    pub fn api(&self) -> String {
        format!("{}:{API_PORT}", self.ip)
    }
    fn peer(&self) -> String {
        format!("{}:{PEER_PORT}", self.ip)
    }
    /// Whether its process runs (paused counts as running).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// The cluster.
pub struct Cluster {
    bin: PathBuf,
    /// Extra `flotilla server` flags.
    extra: Vec<String>,
    initial_cluster: String,
    /// The replica slots (a slot keeps its addresses; its member id changes when it
    /// rejoins as a new member).
    pub replicas: Vec<Replica>,
    /// The id the next rejoining member gets.
    next_id: u64,
}

fn free_prefix() -> String {
    let mut rng = rand::thread_rng();
    loop {
        let prefix = format!("127.{}.{}", rng.gen_range(1..=254), rng.gen_range(1..=254));
        let free = (1..=3).all(|n| {
            [API_PORT, PEER_PORT]
                .iter()
                .all(|p| std::net::TcpListener::bind(format!("{prefix}.{n}:{p}")).is_ok())
        });
        if free {
            return prefix;
        }
    }
}

impl Cluster {
    /// Starts three replicas of `bin` with their data under `dir`, each data directory on
    /// its own small tmpfs when `tmpfs` (so a disk can be filled), each in its own network
    /// namespace of `netns` if given (else on its own loopback address).
    pub fn start(
        bin: &Path,
        dir: &Path,
        tmpfs: bool,
        netns: Option<&crate::netns::Netns>,
        extra: &[&str],
    ) -> anyhow::Result<Cluster> {
        let (ips, namespaces): (Vec<String>, Vec<Option<String>>) = match netns {
            Some(n) => (1..=3)
                .map(|slot| (n.replica_ip(slot), Some(n.replica_ns(slot))))
                .unzip(),
            None => {
                let prefix = free_prefix();
                (1..=3).map(|id| (format!("{prefix}.{id}"), None)).unzip()
            }
        };
        let initial_cluster = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("{}={ip}:{PEER_PORT}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            initial_cluster,
            next_id: 4,
            replicas: (1..=3)
                .map(|id| Replica {
                    id,
                    ip: ips[(id - 1) as usize].clone(),
                    ns: namespaces[(id - 1) as usize].clone(),
                    data_dir: dir.join(format!("replica-{id}")),
                    child: None,
                    paused: false,
                    skew: None,
                    mounted: false,
                    filler: None,
                    joined: false,
                })
                .collect(),
        };
        if tmpfs {
            for r in &mut c.replicas {
                std::fs::create_dir_all(&r.data_dir)?;
                let out = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"])
                    .arg(&r.data_dir)
                    .output()
                    .context("running mount")?;
                if !out.status.success() {
                    bail!(
                        "disk faults need a tmpfs per replica (root): mount: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                r.mounted = true;
            }
        }
        for id in 1..=3 {
            c.launch(id)?;
        }
        c.next_id = 4;
        Ok(c)
    }

    /// The API addresses of all replicas.
    pub fn apis(&self) -> Vec<String> {
        self.replicas.iter().map(Replica::api).collect()
    }

    fn slot(&mut self, id: u64) -> &mut Replica {
        self.replicas
            .iter_mut()
            .find(|r| r.id == id)
            .expect("a member of this cluster")
    }

    /// The current member ids.
    pub fn ids(&self) -> Vec<u64> {
        self.replicas.iter().map(|r| r.id).collect()
    }

    /// Each replica address's network namespace, with `--network netns`.
    pub fn namespaces(&self) -> Option<std::collections::HashMap<String, String>> {
        self.replicas
            .iter()
            .map(|r| r.ns.clone().map(|ns| (r.ip.clone(), ns)))
            .collect()
    }

    /// The address of member `id`.
    pub fn ip(&self, id: u64) -> String {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.ip.clone())
            .unwrap_or_default()
    }

    /// Empties member `id`'s data directory (its process must be stopped) and gives its
    /// slot a new member id, started with `--join`; returns the new id and its peer address
    /// (for `member add`). The caller removes the old member and adds the new one.
    pub fn wipe_for_rejoin(&mut self, id: u64) -> anyhow::Result<(u64, String)> {
        let new_id = self.next_id;
        self.next_id += 1;
        let r = self.slot(id);
        if r.child.is_some() {
            bail!("replica {id} must be stopped before its data is wiped");
        }
        for entry in std::fs::read_dir(&r.data_dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        r.filler = None;
        r.skew = None;
        r.id = new_id;
        r.joined = true;
        Ok((new_id, r.peer()))
    }

    /// Starts replica `id`'s process (its log appended to `<data dir>.log`).
    pub fn launch(&mut self, id: u64) -> anyhow::Result<()> {
        let (bin, initial, extra) = (
            self.bin.clone(),
            self.initial_cluster.clone(),
            self.extra.clone(),
        );
        let r = self.slot(id);
        if r.child.is_some() {
            bail!("replica {id} is already running");
        }
        std::fs::create_dir_all(&r.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(r.data_dir.with_extension("log"))?;
        let mut cmd = match &r.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(offset) = &r.skew {
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
        }
        let child = cmd
            .arg("server")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&r.data_dir)
            .args(["--listen-api", &r.api()])
            .args(["--listen-peer", &r.peer()])
            .args(["--initial-cluster", &initial])
            .args(if r.joined { &["--join"][..] } else { &[][..] })
            .args(&extra)
            // Snapshots every 1,000 entries (etcd's robustness tests do likewise): a run
            // builds, purges and installs many, under the faults.
            .args(["--snapshot-count", "1000"])
            .env(
                "FLOTILLA_LOG",
                "info,openraft=warn,openraft::replication=off",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        r.child = Some(child);
        r.paused = false;
        Ok(())
    }

    /// `kill -9` of replica `id` (resumed first if paused, so it dies at once).
    pub fn kill(&mut self, id: u64) {
        let r = self.slot(id);
        if let Some(mut child) = r.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        r.paused = false;
    }

    /// SIGSTOP of replica `id`.
    pub fn pause(&mut self, id: u64) {
        let r = self.slot(id);
        if let Some(child) = &r.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP);
            r.paused = true;
        }
    }

    /// SIGCONT of replica `id`.
    pub fn resume(&mut self, id: u64) {
        let r = self.slot(id);
        if let Some(child) = &r.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        }
        r.paused = false;
    }

    /// Restarts replica `id` with its wall clock offset by `offset` (libfaketime syntax,
    /// e.g. `+1h`); monotonic clocks, which Raft's timers use, are left alone.
    pub fn restart_skewed(&mut self, id: u64, offset: &str) -> anyhow::Result<()> {
        if !Path::new(LIBFAKETIME).is_file() {
            bail!("clock skew needs libfaketime (apt-get install faketime): no {LIBFAKETIME}");
        }
        self.kill(id);
        self.slot(id).skew = Some(offset.to_string());
        self.launch(id)
    }

    /// Fills replica `id`'s tmpfs: its next writes fail with ENOSPC.
    pub fn fill_disk(&mut self, id: u64) -> anyhow::Result<()> {
        use std::io::Write;
        let r = self.slot(id);
        if !r.mounted {
            bail!("replica {id}'s data directory is not a tmpfs of this run");
        }
        let path = r.data_dir.join("chaos-filler");
        let mut f = std::fs::File::create(&path)?;
        r.filler = Some(path);
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        // Whatever the last partial chunk left, in small pieces.
        while f.write_all(&chunk[..4096]).is_ok() {}
        Ok(())
    }

    /// Ends every fault: paused replicas resume, disks are freed, skewed clocks are put
    /// right (by a restart), and replicas that were stopped or have exited start again.
    /// Returns what it found: replicas that had exited on their own, with their status.
    pub fn heal(&mut self) -> anyhow::Result<Vec<String>> {
        let mut found = Vec::new();
        for id in self.ids() {
            if self.slot(id).paused {
                self.resume(id);
            }
            if let Some(f) = self.slot(id).filler.take() {
                let _ = std::fs::remove_file(f);
            }
            if self.slot(id).skew.is_some() {
                self.kill(id);
                self.slot(id).skew = None;
            }
            let r = self.slot(id);
            if let Some(child) = r.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    found.push(format!("replica {id} had exited by itself ({status})"));
                    r.child = None;
                }
            }
            if !self.slot(id).running() {
                self.launch(id)?;
            }
        }
        Ok(found)
    }

    /// Asks replica `id` for its status.
    pub async fn status(&self, client: &Client, id: u64) -> Option<StatusResponse> {
        let api = self
            .replicas
            .iter()
            .find(|r| r.id == id)
            .map(Replica::api)?;
        client
            .post_to(&api, "/v3/maintenance/status", &serde_json::json!({}))
            .await
            .ok()
    }

    /// The replica that a running, unpaused replica names as leader, if any.
    pub async fn leader(&self, client: &Client) -> Option<u64> {
        for r in &self.replicas {
            if !r.running() || r.paused {
                continue;
            }
            if let Some(s) = self.status(client, r.id).await {
                if s.leader != 0 {
                    return Some(s.leader);
                }
            }
        }
        None
    }

    /// Waits until every replica runs, one leader is agreed on by all, and every replica
    /// has applied what the leader had committed when the wait began.
    pub async fn wait_healthy(&self, client: &Client, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut statuses = Vec::new();
            for id in self.ids() {
                statuses.push(self.status(client, id).await);
            }
            if let Some(all) = statuses.into_iter().collect::<Option<Vec<_>>>() {
                let leader = all[0].leader;
                let agreed = leader != 0 && all.iter().all(|s| s.leader == leader);
                let commit = all.iter().map(|s| s.raft_commit_index).max().unwrap_or(0);
                // ... and the membership is these three replicas, all voters (a rejoined
                // member has been promoted).
                let members: Option<MemberListResponse> = client
                    .post_to(
                        &self.replicas[0].api(),
                        "/v3/cluster/member/list",
                        &serde_json::json!({}),
                    )
                    .await
                    .ok();
                let mut ids: Vec<u64> = members
                    .iter()
                    .flat_map(|m| m.members.iter())
                    .filter(|m| !m.is_learner)
                    .map(|m| m.id)
                    .collect();
                ids.sort_unstable();
                let mut want = self.ids();
                want.sort_unstable();
                if agreed && ids == want && all.iter().all(|s| s.raft_applied_index >= commit) {
                    return Ok(leader);
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster did not recover within {timeout:?} after the faults healed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(mut child) = r.child.take() {
                if r.paused {
                    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            if r.mounted {
                // The data goes with the tmpfs; the logs (outside it) stay.
                let _ = Command::new("umount").arg(&r.data_dir).status();
                r.mounted = false;
            }
        }
    }
}
