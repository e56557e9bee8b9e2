//! `flotilla ctl`: the operator CLI. It talks to any of `--servers`, failing over as
//! [`crate::client`] describes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use flotilla_store::{KvStore, StoreOptions};
use http_body_util::BodyExt;

use crate::client::{Client, ClientError};
use crate::gateway::json::*;

/// Flags and subcommands of `flotilla ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// API addresses of replicas, comma-separated.
    #[arg(
        long,
        env = "FLOTILLA_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:6441,127.0.0.1:6442,127.0.0.1:6443"
    )]
    pub servers: Vec<String>,
    /// Per-request deadline in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Print the API's JSON answers instead of text.
    #[arg(long)]
    pub json: bool,
    /// The cluster CA (PEM): talk HTTPS, checking the replicas' certificates against it
    /// (etcdctl's flag).
    #[arg(long, env = "FLOTILLA_CACERT")]
    pub cacert: Option<PathBuf>,
    /// A client certificate (an administrator's: the key-value API is for system:masters).
    #[arg(long, env = "FLOTILLA_CERT", requires_all = ["key", "cacert"])]
    pub cert: Option<PathBuf>,
    /// The key of `--cert`.
    #[arg(long, env = "FLOTILLA_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// A bearer token from the replicas' `--token-auth-file`.
    #[arg(long, env = "FLOTILLA_TOKEN")]
    pub token: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `flotilla ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List the members.
    Members,
    /// Show every replica's status as a table.
    Status,
    /// Key-value operations.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Membership changes.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Compact history below a revision.
    Compact {
        /// The new compaction point.
        revision: i64,
        /// Wait until the answering replica has physically removed the history.
        #[arg(long)]
        physical: bool,
    },
    /// Snapshots of the store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `flotilla ctl kv ...`
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Read a key (or a prefix, or a range).
    Get {
        /// The key.
        key: String,
        /// Everything with this prefix.
        #[arg(long)]
        prefix: bool,
        /// Everything from the key on.
        #[arg(long)]
        from_key: bool,
        /// End of the range (exclusive).
        #[arg(long)]
        range_end: Option<String>,
        /// Read at this revision.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// At most this many keys.
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Read from the answering replica without the read barrier.
        #[arg(long)]
        serializable: bool,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        /// Print the count only.
        #[arg(long)]
        count_only: bool,
    },
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Print the previous value.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Delete a key (or a prefix).
    Del {
        /// The key.
        key: String,
        /// Everything with this prefix.
        #[arg(long)]
        prefix: bool,
        /// Print the deleted values.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Stream changes until interrupted.
    Watch {
        /// The key.
        key: String,
        /// Everything with this prefix.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision (replays history).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Show previous values.
        #[arg(long)]
        prev_kv: bool,
    },
}

/// `flotilla ctl member ...`
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a member (start it with `flotilla server --join` first or right after).
    Add {
        /// Its id.
        id: u64,
        /// Its peer address (`host:port`).
        #[arg(long)]
        peer_url: String,
        /// Keep it a learner (non-voting).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member.
    Remove {
        /// Its id.
        id: u64,
    },
    /// Promote a learner to voter.
    Promote {
        /// Its id.
        id: u64,
    },
}

/// `flotilla ctl leader ...`
#[derive(Debug, Subcommand)]
pub enum LeaderCommand {
    /// Move leadership to a voter.
    Transfer {
        /// The new leader's id.
        id: u64,
    },
}

/// `flotilla ctl snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a consistent point-in-time copy of the store to a file.
    Save {
        /// Where to write it.
        file: PathBuf,
    },
    /// Seed a new replica's data directory from a saved snapshot (offline; every replica of
    /// the new cluster is restored from the same file, then started with `--initial-cluster`).
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// The new replica's data directory (must not exist or be empty).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// The exclusive end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The range end for `key` alone, or for every key with the prefix `key`.
fn prefix_range_end(key: &str, prefix: bool) -> Vec<u8> {
    if prefix {
        prefix_end(key.as_bytes())
    } else {
        Vec::new()
    }
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// Runs a `flotilla ctl` command.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let tls = match &args.cacert {
        Some(ca) => Some(std::sync::Arc::new(crate::tls::client_config(
            ca,
            args.cert.as_deref().zip(args.key.as_deref()),
        )?)),
        None => None,
    };
    let mut client = Client::with_tls(
        args.servers.clone(),
        Duration::from_millis(args.timeout_ms),
        tls,
    );
    if let Some(t) = &args.token {
        client = client.with_bearer(t);
    }
    match args.command {
        CtlCommand::Members => {
            let r: MemberListResponse = client
                .post("/v3/cluster/member/list", &serde_json::json!({}))
                .await?;
            if args.json {
                print_json(&r);
            } else {
                println!("{:<6} {:<8} {:<24} {:<24}", "ID", "ROLE", "PEER", "API");
                for m in r.members {
                    println!(
                        "{:<6} {:<8} {:<24} {:<24}",
                        m.id,
                        if m.is_learner { "learner" } else { "voter" },
                        m.peer_urls.join(","),
                        m.client_urls.join(",")
                    );
                }
            }
        }
        CtlCommand::Status => status(&client, args.json).await?,
        CtlCommand::Kv(cmd) => kv(&client, cmd, args.json).await?,
        CtlCommand::Member(cmd) => {
            let r: MemberListResponse = match cmd {
                MemberCommand::Add {
                    id,
                    peer_url,
                    learner,
                } => {
                    let req = MemberAddRequest {
                        id,
                        peer_urls: vec![peer_url],
                        is_learner: learner,
                    };
                    client.post("/v3/cluster/member/add", &req).await?
                }
                MemberCommand::Remove { id } => {
                    client
                        .post("/v3/cluster/member/remove", &MemberIdRequest { id })
                        .await?
                }
                MemberCommand::Promote { id } => {
                    client
                        .post("/v3/cluster/member/promote", &MemberIdRequest { id })
                        .await?
                }
            };
            if args.json {
                print_json(&r);
            } else {
                println!(
                    "ok; members: {}",
                    r.members
                        .iter()
                        .map(|m| m.id.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
        }
        CtlCommand::Leader(LeaderCommand::Transfer { id }) => {
            let _: serde_json::Value = client
                .post(
                    "/v3/maintenance/transfer-leadership",
                    &TransferLeadershipRequest { target_id: id },
                )
                .await?;
            println!("leadership transferred to {id}");
        }
        CtlCommand::Compact { revision, physical } => {
            let r: serde_json::Value = client
                .post(
                    "/v3/kv/compaction",
                    &CompactionRequest { revision, physical },
                )
                .await?;
            if args.json {
                print_json(&r);
            } else {
                println!("compacted revision {revision}");
            }
        }
        CtlCommand::Snapshot(SnapshotCommand::Save { file }) => {
            snapshot_save(&client, &file).await?
        }
        CtlCommand::Snapshot(SnapshotCommand::Restore { file, data_dir }) => {
            snapshot_restore(&file, &data_dir)?
        }
    }
    Ok(())
}

async fn kv(client: &Client, cmd: KvCommand, as_json: bool) -> anyhow::Result<()> {
    match cmd {
        KvCommand::Get {
            key,
            prefix,
            from_key,
            range_end,
            rev,
            limit,
            serializable,
            keys_only,
            count_only,
        } => {
            let range_end = if prefix {
                prefix_end(key.as_bytes())
            } else if from_key {
                vec![0]
            } else {
                range_end.map(String::into_bytes).unwrap_or_default()
            };
            let req = RangeRequest {
                key: key.into_bytes(),
                range_end,
                limit,
                revision: rev,
                serializable,
                keys_only,
                count_only,
            };
            let r: RangeResponse = client.post("/v3/kv/range", &req).await?;
            if as_json {
                print_json(&r);
            } else if count_only {
                println!("{}", r.count);
            } else {
                for kv in r.kvs {
                    println!("{}", show(&kv.key));
                    if !keys_only {
                        println!("{}", show(&kv.value));
                    }
                }
            }
        }
        KvCommand::Put {
            key,
            value,
            prev_kv,
        } => {
            let req = PutRequest {
                key: key.into_bytes(),
                value: value.into_bytes(),
                prev_kv,
                lease: 0,
            };
            let r: PutResponse = client.post("/v3/kv/put", &req).await?;
            if as_json {
                print_json(&r);
            } else {
                println!("OK (revision {})", r.header.revision);
                if let Some(p) = r.prev_kv {
                    println!("{}\n{}", show(&p.key), show(&p.value));
                }
            }
        }
        KvCommand::Del {
            key,
            prefix,
            prev_kv,
        } => {
            let range_end = prefix_range_end(&key, prefix);
            let req = DeleteRangeRequest {
                key: key.into_bytes(),
                range_end,
                prev_kv,
            };
            let r: DeleteRangeResponse = client.post("/v3/kv/deleterange", &req).await?;
            if as_json {
                print_json(&r);
            } else {
                println!("{}", r.deleted);
                for p in r.prev_kvs {
                    println!("{}\n{}", show(&p.key), show(&p.value));
                }
            }
        }
        KvCommand::Watch {
            key,
            prefix,
            rev,
            prev_kv,
        } => {
            let range_end = prefix_range_end(&key, prefix);
            let req = WatchRequest {
                create_request: WatchCreateRequest {
                    key: key.into_bytes(),
                    range_end,
                    start_revision: rev,
                    progress_notify: false,
                    prev_kv,
                },
            };
            watch(client, &req, as_json).await?;
        }
    }
    Ok(())
}

/// Streams a watch to stdout. On a cancel that can be resumed (slow watcher, replica
/// restart) it resumes from the next revision on another replica.
async fn watch(client: &Client, req: &WatchRequest, as_json: bool) -> anyhow::Result<()> {
    let mut req = req.clone();
    let mut next_rev = req.create_request.start_revision;
    let mut failures = 0;
    'servers: loop {
        for server in client.servers() {
            req.create_request.start_revision = next_rev;
            let body = serde_json::to_vec(&req)?;
            let resp = match client.post_raw(server, "/v3/watch", body, None).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("watch: {e}");
                    continue;
                }
            };
            if resp.status() != 200 {
                let bytes = resp.into_body().collect().await?.to_bytes();
                bail!("watch refused by {server}: {}", show(&bytes));
            }
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let msg: WatchLine =
                        serde_json::from_slice(&line).context("decoding a watch line")?;
                    if as_json {
                        println!("{}", show(&line).trim_end());
                    }
                    let r = msg.result;
                    if r.canceled {
                        if r.compact_revision > 0 {
                            bail!(
                                "watch cancelled: {} (compact revision {})",
                                r.cancel_reason,
                                r.compact_revision
                            );
                        }
                        eprintln!("watch cancelled: {}; resuming", r.cancel_reason);
                        continue 'servers;
                    }
                    for e in &r.events {
                        next_rev = next_rev.max(e.kv.mod_revision + 1);
                        if !as_json {
                            println!("{}\n{}\n{}", e.kind, show(&e.kv.key), show(&e.kv.value));
                            if let Some(p) = &e.prev_kv {
                                println!("(previous) {}", show(&p.value));
                            }
                        }
                    }
                    if next_rev == 0 && r.created {
                        next_rev = r.header.revision + 1;
                    }
                    std::io::stdout().flush()?;
                }
            }
            eprintln!("watch stream from {server} ended; resuming from revision {next_rev}");
        }
        failures += 1;
        if failures > 30 {
            bail!("no replica would serve the watch");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn status(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let members: MemberListResponse = client
        .post("/v3/cluster/member/list", &serde_json::json!({}))
        .await?;
    let mut rows = Vec::new();
    for m in &members.members {
        let api = m
            .client_urls
            .first()
            .map(|u| u.trim_start_matches("http://").to_string());
        let status = match &api {
            Some(api) => client
                .post_to::<_, StatusResponse>(api, "/v3/maintenance/status", &serde_json::json!({}))
                .await
                .map_err(|e: ClientError| e.to_string()),
            None => Err("API address not announced yet".into()),
        };
        rows.push((m.clone(), api, status));
    }
    if as_json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(m, api, s)| match s {
                Ok(s) => serde_json::json!({ "member": m, "api": api, "status": s }),
                Err(e) => serde_json::json!({ "member": m, "api": api, "error": e }),
            })
            .collect();
        print_json(&out);
        return Ok(());
    }
    let h = [
        "ID", "API", "STATE", "TERM", "LEADER", "LAST IDX", "COMMIT", "APPLIED", "REVISION",
        "DB SIZE", "KEYS", "ERRORS",
    ];
    println!(
        "{:<4} {:<22} {:<10} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}  {}",
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]
    );
    for (m, api, s) in rows {
        let api = api.unwrap_or_else(|| "-".into());
        match s {
            Ok(s) => println!(
                "{:<4} {:<22} {:<10} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}  {}",
                m.id,
                api,
                s.state,
                s.raft_term,
                s.leader,
                s.raft_index,
                s.raft_commit_index,
                s.raft_applied_index,
                s.header.revision,
                s.db_size,
                s.keys,
                s.errors.join(", ")
            ),
            Err(e) => println!("{:<4} {:<22} {:<10} {e}", m.id, api, "unreachable"),
        }
    }
    Ok(())
}

async fn snapshot_save(client: &Client, file: &PathBuf) -> anyhow::Result<()> {
    let tmp = file.with_extension("part");
    let mut last_err = None;
    for server in client.servers() {
        let resp = match client
            .post_raw(server, "/v3/maintenance/snapshot", b"{}".to_vec(), None)
            .await
        {
            Ok(r) if r.status() == 200 => r,
            Ok(r) => {
                last_err = Some(format!("{server} answered {}", r.status()));
                continue;
            }
            Err(e) => {
                last_err = Some(e.to_string());
                continue;
            }
        };
        let mut out =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut body = resp.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.context("snapshot stream broke")?;
            if let Some(data) = frame.data_ref() {
                out.write_all(data)?;
                bytes += data.len() as u64;
            }
        }
        out.sync_all()?;
        drop(out);
        // Check the whole stream (magic, frames, checksum) before calling it saved.
        let info = flotilla_store::verify_snapshot(&mut std::io::BufReader::new(
            std::fs::File::open(&tmp)?,
        ))
        .with_context(|| format!("the snapshot from {server} is incomplete or damaged"))?;
        std::fs::rename(&tmp, file)?;
        println!(
            "saved snapshot of revision {} ({} rows, {bytes} bytes) from {server} to {}",
            info.revision,
            info.rows,
            file.display()
        );
        return Ok(());
    }
    bail!(
        "no replica served a snapshot: {}",
        last_err.unwrap_or_default()
    )
}

fn snapshot_restore(file: &PathBuf, data_dir: &PathBuf) -> anyhow::Result<()> {
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        bail!(
            "{} is not empty; restore needs a fresh data directory",
            data_dir.display()
        );
    }
    let kv = KvStore::open(data_dir.join("sm"), StoreOptions::default())?;
    let mut input = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
    );
    let info = kv.install(&mut input).context("restoring the snapshot")?;
    kv.forget_raft_state()?;
    kv.close();
    println!(
        "restored revision {} ({} rows) into {}; start the replica with --data-dir {} and the new --initial-cluster",
        info.revision,
        info.rows,
        data_dir.display(),
        data_dir.display()
    );
    Ok(())
}
