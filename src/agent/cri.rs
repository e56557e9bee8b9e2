//! The `cri` runtime: containers through a CRI v1 runtime (containerd) over its gRPC socket.
//!
//! One pod sandbox per pod, made before the pod's first container and removed with the pod.
//! With `--cri-network pod` (the default) a pod that is not `hostNetwork` gets a network
//! namespace of its own, its address from the runtime's CNI (a bridge, say: see
//! `deploy/containerd`), read from the sandbox's status before any container starts (it is
//! `status.podIP`, what probes connect to and what the pod's environment says); otherwise,
//! and for `hostNetwork` pods, the pod is on the node's network and its IP is the node's.
//! Containers are created and started in
//! it from images the runtime already has (no registry is reachable: `IfNotPresent` and
//! `Never` use a local image; a missing image, or `Always`, is a pull, whose failure is
//! `ErrImagePull`). The runtime writes each container's CRI-format log to
//! `<pod dir>/<container>/<run>.log`, the layout the agent's log endpoint reads. Exec probes
//! are `ExecSync`.
//!
//! Owns, per pod directory: `sandbox.id` (the sandbox) and per container `<name>.cri` (its
//! id and the one of its previous run, kept for `kubectl logs --previous` and removed when a
//! newer run starts), so a restarted agent adopts what the runtime still runs.
//! Exits are learned by one poller per runtime (`ListContainers` every 500 ms, then
//! `ContainerStatus` once per exited container), so checking a container never waits on
//! the runtime.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::runtime::{
    BoxFuture, Container, ExecSession, Handle, Runtime, Sandbox, Spec, StartError, Stats,
};
use super::shim::{write_whole, Exit};

/// What the poller knows: exits by container id, and the ids the runtime listed last.
#[derive(Default)]
struct Known {
    exits: HashMap<String, Exit>,
    /// The ids listed last, and when that list was asked for.
    listed: Option<(std::time::Instant, HashSet<String>)>,
}

/// The CRI runtime client.
pub struct CriRuntime {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// `containerd://1.6.20`, say.
    version: String,
    /// The runtime's name, the scheme of container ids (`containerd`).
    name: String,
    known: Arc<Mutex<Known>>,
    /// Pods that are not `hostNetwork` get a network namespace of their own from the
    /// runtime's CNI (`--cri-network pod`); otherwise every pod is on the node's network.
    pod_network: bool,
}

/// A container's ids, current and previous run (`<name>.cri`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    id: String,
    previous: Option<String>,
}

fn status_err(what: &str, e: tonic::Status) -> String {
    format!("{what}: {}", e.message())
}

impl CriRuntime {
    /// Connects to the CRI socket at `endpoint` (`unix:///run/containerd/containerd.sock`)
    /// and starts the exit poller.
    pub async fn connect(endpoint: &str, pod_network: bool) -> anyhow::Result<CriRuntime> {
        let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
        let socket = path.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot reach the CRI runtime at {}: {e}", path.display())
            })?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let v = runtime
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "the CRI runtime at {} does not answer Version: {}",
                    path.display(),
                    e.message()
                )
            })?
            .into_inner();
        let known = Arc::new(Mutex::new(Known::default()));
        tokio::spawn(poll_exits(runtime.clone(), known.clone()));
        Ok(CriRuntime {
            images: ImageServiceClient::new(channel),
            version: format!("{}://{}", v.runtime_name, v.runtime_version),
            name: v.runtime_name,
            runtime,
            known,
            pod_network,
        })
    }

    /// Whether the pod gets a network namespace of its own.
    fn own_network(&self, sb: &Sandbox<'_>) -> bool {
        self.pod_network && !sb.pod.host_network
    }

    /// The pod's sandbox config (the same each time: CreateContainer is given it too).
    fn sandbox_config(&self, sb: &Sandbox<'_>) -> cri::PodSandboxConfig {
        let spec = sb;
        let own_network = self.own_network(sb);
        let mut labels: HashMap<String, String> = spec.pod.labels.clone().into_iter().collect();
        labels.insert("io.kubernetes.pod.name".into(), spec.pod.name.clone());
        labels.insert(
            "io.kubernetes.pod.namespace".into(),
            spec.pod.namespace.clone(),
        );
        labels.insert("io.kubernetes.pod.uid".into(), spec.pod.uid.clone());
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.pod.name.clone(),
                uid: spec.pod.uid.clone(),
                namespace: spec.pod.namespace.clone(),
                attempt: 0,
            }),
            // A host-network sandbox takes the node's hostname (an empty one here); a pod
            // with a network of its own, its own.
            hostname: if own_network {
                spec.pod.hostname.clone()
            } else {
                String::new()
            },
            log_directory: spec.state_dir.display().to_string(),
            labels,
            dns_config: spec.dns.as_ref().map(|d| cri::DnsConfig {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxConfig {
                // The pod's cgroup, where the process runtime puts it too.
                cgroup_parent: Self::cgroup_parent(spec),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if own_network {
                            cri::NamespaceMode::Pod as i32
                        } else {
                            cri::NamespaceMode::Node as i32
                        },
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `/flotilla/<node>/<pod uid>`: the pod's cgroup.
    fn cgroup_parent(sb: &Sandbox<'_>) -> String {
        format!("/{}", sb.cgroup)
    }

    /// The pod's sandbox, made if it has none that is ready.
    async fn sandbox(
        &self,
        spec: &Sandbox<'_>,
        config: &cri::PodSandboxConfig,
    ) -> Result<String, StartError> {
        let file = spec.state_dir.join("sandbox.id");
        if let Ok(id) = std::fs::read_to_string(&file) {
            let ready = self
                .runtime
                .clone()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.clone(),
                    verbose: false,
                })
                .await
                .map_err(|e| tracing::debug!(error = e.message(), "sandbox status"))
                .ok()
                .and_then(|r| r.into_inner().status)
                .inspect(|s| tracing::debug!(state = s.state, "sandbox status"))
                .is_some_and(|s| s.state == cri::PodSandboxState::SandboxReady as i32);
            if ready {
                return Ok(id);
            }
        }
        if let Some(n) = spec.pids_limit {
            // The pod's process limit, on the cgroup the sandbox is put under.
            let dir = Path::new("/sys/fs/cgroup/pids")
                .join(Self::cgroup_parent(spec).trim_start_matches('/'));
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join("pids.max"), n.to_string()))
                .map_err(|e| StartError {
                    reason: "CreateContainerError",
                    message: format!("cannot enforce the pod's pid limit: {}: {e}", dir.display()),
                })?;
        }
        // What containerd still holds for the pod: a ready sandbox this agent made but did
        // not record (it stopped in between) is the pod's; a dead one or one whose network
        // setup failed still holds the pod's sandbox name, so it goes (as the kubelet's
        // sandbox cleanup does) and the new one is the next attempt.
        let mut attempt = 0;
        let mut adopted = None;
        for old in self.sandboxes_of(&spec.pod.uid).await {
            attempt = attempt.max(old.metadata.as_ref().map_or(0, |m| m.attempt + 1));
            if adopted.is_none() && old.state == cri::PodSandboxState::SandboxReady as i32 {
                adopted = Some(old.id);
            } else {
                self.discard_sandbox(old.id).await;
            }
        }
        let mut config = config.clone();
        if let Some(m) = config.metadata.as_mut() {
            m.attempt = attempt;
        }
        let id = match adopted {
            Some(id) => id,
            None => self.run_sandbox(config).await?,
        };
        let _ = std::fs::write(
            spec.state_dir.join("sandbox.cgroup"),
            Self::cgroup_parent(spec),
        );
        write_whole(&file, id.as_bytes()).map_err(|e| StartError {
            reason: "CreateContainerError",
            message: format!("{}: {e}", file.display()),
        })?;
        Ok(id)
    }

    /// Asks the runtime for a new sandbox; returns its id.
    async fn run_sandbox(&self, config: cri::PodSandboxConfig) -> Result<String, StartError> {
        Ok(self
            .runtime
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|e| StartError {
                reason: "CreateContainerError",
                message: status_err("creating the pod sandbox", e),
            })?
            .into_inner()
            .pod_sandbox_id)
    }

    /// The sandboxes the runtime holds for pod `uid` (by the uid label each is made with);
    /// none if it cannot say.
    async fn sandboxes_of(&self, uid: &str) -> Vec<cri::PodSandbox> {
        let filter = cri::PodSandboxFilter {
            label_selector: [("io.kubernetes.pod.uid".to_string(), uid.to_string())].into(),
            ..Default::default()
        };
        match self
            .runtime
            .clone()
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await
        {
            Ok(r) => r.into_inner().items,
            Err(e) => {
                tracing::warn!(error = e.message(), uid, "listing the pod's sandboxes");
                Vec::new()
            }
        }
    }

    /// Stops and removes sandbox `id` (and what runs in it).
    async fn discard_sandbox(&self, id: String) {
        let mut rt = self.runtime.clone();
        let _ = rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await;
        if let Err(e) = rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
        {
            tracing::warn!(error = e.message(), id, "the pod sandbox was not removed");
        }
    }

    /// Makes sure the image is there, pulling per the policy.
    async fn image(
        &self,
        spec: &Spec<'_>,
        config: &cri::PodSandboxConfig,
    ) -> Result<(), StartError> {
        let image = cri::ImageSpec {
            image: spec.image.clone(),
            ..Default::default()
        };
        let present = self
            .images
            .clone()
            .image_status(cri::ImageStatusRequest {
                image: Some(image.clone()),
                verbose: false,
            })
            .await
            .map_err(|e| StartError {
                reason: "ErrImagePull",
                message: status_err("image status", e),
            })?
            .into_inner()
            .image
            .is_some();
        match spec.pull_policy.as_str() {
            "Never" if present => Ok(()),
            "Never" => Err(StartError {
                reason: "ErrImageNeverPull",
                message: format!(
                    "Container image {:?} is not present with pull policy of Never",
                    spec.image
                ),
            }),
            "IfNotPresent" if present => Ok(()),
            _ => {
                self.images
                    .clone()
                    .pull_image(cri::PullImageRequest {
                        image: Some(image),
                        auth: None,
                        sandbox_config: Some(config.clone()),
                    })
                    .await
                    .map_err(|e| StartError {
                        reason: "ErrImagePull",
                        message: format!(
                            "Failed to pull image {:?}: {} (no registry is reachable: import the image with `ctr -n k8s.io images import` and use imagePullPolicy IfNotPresent or Never)",
                            spec.image,
                            e.message()
                        ),
                    })?;
                Ok(())
            }
        }
    }

    /// The pod's sandbox, made ready before its first container; its address when it has a
    /// network of its own (what the runtime's CNI gave it).
    async fn prepare(&self, sb: &Sandbox<'_>) -> Result<Option<String>, StartError> {
        std::fs::create_dir_all(sb.state_dir).map_err(|e| StartError {
            reason: "CreateContainerError",
            message: format!("{}: {e}", sb.state_dir.display()),
        })?;
        let config = self.sandbox_config(sb);
        let id = self.sandbox(sb, &config).await?;
        if !self.own_network(sb) {
            return Ok(None);
        }
        let status = self
            .runtime
            .clone()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: false,
            })
            .await
            .map_err(|e| StartError {
                reason: "CreateContainerError",
                message: status_err("the pod sandbox's status", e),
            })?
            .into_inner();
        status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .map(Some)
            .ok_or_else(|| StartError {
                reason: "CreateContainerError",
                message: "the pod sandbox has no IP address (is the runtime's CNI configured?)"
                    .into(),
            })
    }

    async fn start_container(&self, spec: &Spec<'_>) -> Result<Handle, StartError> {
        std::fs::create_dir_all(&spec.state_dir).map_err(|e| StartError {
            reason: "CreateContainerError",
            message: format!("{}: {e}", spec.state_dir.display()),
        })?;
        let sb = spec.sandbox();
        let config = self.sandbox_config(&sb);
        self.image(spec, &config).await?;
        let sandbox = self.sandbox(&sb, &config).await?;
        let record_file = spec.state_dir.join(format!("{}.cri", spec.name));
        let old: Record = std::fs::read(&record_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // Only the previous run is kept (for its log); the one before goes.
        if let Some(gone) = old.previous.as_ref() {
            let _ = self
                .runtime
                .clone()
                .remove_container(cri::RemoveContainerRequest {
                    container_id: gone.clone(),
                })
                .await;
        }
        let log_path = spec
            .log
            .strip_prefix(&spec.state_dir)
            .unwrap_or(&spec.log)
            .display()
            .to_string();
        if let Some(d) = spec.log.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let mut resources = cri::LinuxContainerResources::default();
        if let Some(m) = spec.memory_limit {
            resources.memory_limit_in_bytes = m as i64;
        }
        if let Some(c) = spec.cpu_limit {
            resources.cpu_period = 100_000;
            resources.cpu_quota = (c as i64 * 100).max(1000);
        }
        let mut labels = HashMap::new();
        labels.insert(
            "io.kubernetes.container.name".to_string(),
            spec.name.to_string(),
        );
        labels.insert("io.kubernetes.pod.uid".to_string(), spec.pod.uid.clone());
        let container = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.to_string(),
                attempt: spec.attempt,
            }),
            image: Some(cri::ImageSpec {
                image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            working_dir: spec.working_dir.clone().unwrap_or_default(),
            envs: spec
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| cri::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.display().to_string(),
                    readonly: m.read_only,
                    ..Default::default()
                })
                .collect(),
            labels,
            log_path,
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(resources),
                security_context: None,
            }),
            ..Default::default()
        };
        let mut rt = self.runtime.clone();
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox,
                config: Some(container),
                sandbox_config: Some(config),
            })
            .await
            .map_err(|e| StartError {
                reason: "CreateContainerError",
                message: status_err("creating the container", e),
            })?
            .into_inner()
            .container_id;
        let record = Record {
            id: id.clone(),
            previous: (!old.id.is_empty()).then_some(old.id),
        };
        let bytes = serde_json::to_vec(&record).expect("a record serializes");
        if let Err(e) = write_whole(&record_file, &bytes) {
            let _ = rt
                .remove_container(cri::RemoveContainerRequest { container_id: id })
                .await;
            return Err(StartError {
                reason: "CreateContainerError",
                message: format!("{}: {e}", record_file.display()),
            });
        }
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .map_err(|e| StartError {
            reason: "RunContainerError",
            message: status_err("starting the container", e),
        })?;
        Ok(Box::new(self.handle(id)))
    }

    fn handle(&self, id: String) -> CriContainer {
        CriContainer {
            id,
            since: std::time::Instant::now(),
            scheme: self.name.clone(),
            runtime: self.runtime.clone(),
            known: self.known.clone(),
        }
    }
}

impl Runtime for CriRuntime {
    fn version(&self) -> String {
        self.version.clone()
    }

    fn start<'a>(&'a self, spec: &'a Spec<'a>) -> BoxFuture<'a, Result<Handle, StartError>> {
        Box::pin(self.start_container(spec))
    }

    fn pod_network(&self) -> bool {
        self.pod_network
    }

    fn prepare_pod<'a>(
        &'a self,
        sb: &'a Sandbox<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, StartError>> {
        Box::pin(self.prepare(sb))
    }

    fn adopt(&self, state_dir: &Path, name: &str) -> Option<Handle> {
        let r: Record =
            serde_json::from_slice(&std::fs::read(state_dir.join(format!("{name}.cri"))).ok()?)
                .ok()?;
        Some(Box::new(self.handle(r.id)))
    }

    fn exec<'a>(
        &'a self,
        state_dir: &'a Path,
        name: &'a str,
        argv: Vec<String>,
        stdin: bool,
    ) -> BoxFuture<'a, Result<ExecSession, String>> {
        Box::pin(async move {
            if stdin {
                return Err("exec with stdin (-i) is not supported under the cri runtime: it runs commands to the end (ExecSync); leave out -i".into());
            }
            let r: Record = std::fs::read(state_dir.join(format!("{name}.cri")))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| format!("container {name:?} has not started"))?;
            let out = self
                .runtime
                .clone()
                .exec_sync(cri::ExecSyncRequest {
                    container_id: r.id,
                    cmd: argv,
                    timeout: 0,
                })
                .await
                .map_err(|e| status_err("exec", e))?
                .into_inner();
            Ok(ExecSession::Finished {
                stdout: out.stdout,
                stderr: out.stderr,
                code: out.exit_code,
            })
        })
    }

    fn remove_pod<'a>(&'a self, state_dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let recorded = std::fs::read_to_string(state_dir.join("sandbox.id")).ok();
            // Every sandbox of the pod, the recorded one and any a failed attempt left.
            let uid = state_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit('_').next())
                .filter(|u| !u.is_empty());
            let mut ids: Vec<String> = match uid {
                Some(uid) => self
                    .sandboxes_of(uid)
                    .await
                    .into_iter()
                    .map(|s| s.id)
                    .collect(),
                None => Vec::new(),
            };
            if let Some(id) = recorded {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            for id in ids {
                self.discard_sandbox(id).await;
            }
            // The pod's cgroups (the runtime removes its containers'), and the node's and
            // `flotilla` once empty.
            // containerd removes its containers' cgroups as their processes go, so this is
            // tried for a while (the directories only go once empty).
            if let Ok(parent) = std::fs::read_to_string(state_dir.join("sandbox.cgroup")) {
                let dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|c| c.path().join(parent.trim_start_matches('/')))
                    .collect();
                for _ in 0..50 {
                    for dir in &dirs {
                        remove_empty_tree(dir);
                        for d in dir.ancestors().skip(1).take(2) {
                            if std::fs::remove_dir(d).is_err() {
                                break;
                            }
                        }
                    }
                    if dirs.iter().all(|d| !d.exists()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let _ = std::fs::remove_dir_all(state_dir);
        })
    }
}

/// Removes a cgroup directory and the empty ones below it, bottom-up (a cgroup directory
/// only goes once no process is left in it).
fn remove_empty_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A container in the CRI runtime.
struct CriContainer {
    id: String,
    /// When this agent made or adopted it.
    since: std::time::Instant,
    scheme: String,
    runtime: RuntimeServiceClient<Channel>,
    known: Arc<Mutex<Known>>,
}

impl Container for CriContainer {
    fn id(&self) -> String {
        format!("{}://{}", self.scheme, self.id)
    }

    fn exit(&mut self) -> Option<Exit> {
        let k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = k.exits.get(&self.id) {
            return Some(e.clone());
        }
        // Gone from the runtime altogether (removed behind the agent's back): absent from a
        // list asked for after it was created.
        if k.listed
            .as_ref()
            .is_some_and(|(at, l)| *at > self.since && !l.contains(&self.id))
        {
            return Some(Exit {
                code: 255,
                finished_at: crate::api::meta::now_secs(),
                oom_killed: false,
            });
        }
        None
    }

    fn signal(&self, sig: Signal) {
        // SIGTERM: the runtime stops it with the image's stop signal, killing it after a
        // while (the pod worker's SIGKILL at the end of the grace period comes first);
        // SIGKILL: at once.
        let timeout = if sig == Signal::SIGKILL { 0 } else { 3600 };
        let (mut rt, id) = (self.runtime.clone(), self.id.clone());
        tokio::spawn(async move {
            let _ = rt
                .stop_container(cri::StopContainerRequest {
                    container_id: id,
                    timeout,
                })
                .await;
        });
    }

    fn release(&self) {}

    fn stats(&self) -> BoxFuture<'static, Option<Stats>> {
        let (mut rt, id) = (self.runtime.clone(), self.id.clone());
        Box::pin(async move {
            let s = rt
                .container_stats(cri::ContainerStatsRequest { container_id: id })
                .await
                .ok()?
                .into_inner()
                .stats?;
            Some(Stats {
                cpu_seconds: s.cpu?.usage_core_nano_seconds?.value as f64 / 1e9,
                memory_bytes: s.memory?.working_set_bytes?.value,
            })
        })
    }

    fn exec(
        &self,
        argv: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<i32, String>> {
        let (mut rt, id) = (self.runtime.clone(), self.id.clone());
        Box::pin(async move {
            rt.exec_sync(cri::ExecSyncRequest {
                container_id: id,
                cmd: argv,
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await
            .map(|r| r.into_inner().exit_code)
            .map_err(|e| status_err("exec", e))
        })
    }
}

/// Learns containers' exits: lists them every 500 ms and asks each newly exited one how it
/// ended.
async fn poll_exits(mut rt: RuntimeServiceClient<Channel>, known: Arc<Mutex<Known>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let asked = std::time::Instant::now();
        let Ok(list) = rt
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
        else {
            continue;
        };
        let list = list.into_inner().containers;
        let fresh: Vec<String> = {
            let k = known.lock().unwrap_or_else(|p| p.into_inner());
            list.iter()
                .filter(|c| c.state == cri::ContainerState::ContainerExited as i32)
                .filter(|c| !k.exits.contains_key(&c.id))
                .map(|c| c.id.clone())
                .collect()
        };
        let mut exits = Vec::new();
        for id in fresh {
            let Ok(s) = rt
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
            else {
                continue;
            };
            if let Some(s) = s.into_inner().status {
                exits.push((
                    id,
                    Exit {
                        code: s.exit_code,
                        finished_at: (s.finished_at / 1_000_000_000).max(0) as u64,
                        oom_killed: s.reason == "OOMKilled",
                    },
                ));
            }
        }
        let mut k = known.lock().unwrap_or_else(|p| p.into_inner());
        let listed: HashSet<String> = list.into_iter().map(|c| c.id).collect();
        k.exits.retain(|id, _| listed.contains(id));
        k.exits.extend(exits);
        k.listed = Some((asked, listed));
    }
}
