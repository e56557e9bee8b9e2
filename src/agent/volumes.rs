//! Pod volumes: `emptyDir`, `configMap`, `secret`, `downwardAPI`, `projected` (of those) and
//! `hostPath`, made ready in the pod's directory before its containers start.
//!
//! Each volume is a directory `volumes/<name>` under the pod's directory (a `hostPath` is the
//! host path itself). ConfigMap, Secret and downward API volumes are written from the API
//! and written again on every sync, so edits reach running containers as they do under
//! the kubelet; each file is replaced whole (written beside, then renamed), so a reader
//! never sees half of one, and keys that went away are removed.
//!
//! Owns nothing beyond the files it writes. Invariants: a volume that cannot be made ready
//! (a missing ConfigMap that is not optional, a `hostPath` of the wrong type, an unsupported
//! source) is an error naming the volume, and nothing of the pod starts until every volume
//! is ready, as the kubelet's `FailedMount` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::pod::{Env, Sources};
use super::runtime::Mount;
use crate::controllers::owner;

/// Where volume `name` of the pod whose directory is `pod_dir` lives on the host.
pub fn source(pod: &Value, pod_dir: &Path, name: &str) -> Option<PathBuf> {
    let v = volumes(pod)
        .into_iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(name))?;
    Some(match v.pointer("/hostPath/path").and_then(Value::as_str) {
        Some(p) => PathBuf::from(p),
        None => pod_dir.join("volumes").join(name),
    })
}

fn volumes(pod: &Value) -> Vec<Value> {
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Makes (or refreshes) every volume of `pod` under `pod_dir`.
pub async fn prepare(pod: &Value, pod_dir: &Path, env: &Env) -> Result<(), String> {
    let ns = owner::namespace(pod).unwrap_or("default");
    let mut sources = Sources::default();
    for v in volumes(pod) {
        let name = v.get("name").and_then(Value::as_str).unwrap_or("");
        let dir = pod_dir.join("volumes").join(name);
        let fail = |e: String| format!("MountVolume.SetUp failed for volume {name:?} : {e}");
        if v.get("emptyDir").is_some() {
            std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        } else if let Some(h) = v.get("hostPath") {
            host_path(h).map_err(fail)?;
        } else if v.get("configMap").is_some()
            || v.get("secret").is_some()
            || v.get("downwardAPI").is_some()
            || v.get("projected").is_some()
        {
            let files = files(pod, &v, ns, env, &mut sources).await.map_err(fail)?;
            write_files(&dir, &files).map_err(fail)?;
        } else {
            let kind = v
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "name").cloned())
                .unwrap_or_else(|| "none".into());
            return Err(fail(format!(
                "the {kind} volume source is not supported by this node's runtime"
            )));
        }
    }
    Ok(())
}

/// Checks (and for the `...OrCreate` types, makes) a `hostPath`.
fn host_path(h: &Value) -> Result<(), String> {
    let path = Path::new(h.get("path").and_then(Value::as_str).unwrap_or(""));
    let kind = h.get("type").and_then(Value::as_str).unwrap_or("");
    let meta = std::fs::metadata(path);
    use std::os::unix::fs::FileTypeExt;
    let is = |want: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "hostPath type check failed: {} is not a {want}",
                path.display()
            ))
        }
    };
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" => std::fs::create_dir_all(path).map_err(|e| e.to_string()),
        "FileOrCreate" => {
            if meta.is_ok() {
                return is("file", meta.as_ref().is_ok_and(|m| m.is_file()));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        "Directory" => is("directory", meta.is_ok_and(|m| m.is_dir())),
        "File" => is("file", meta.is_ok_and(|m| m.is_file())),
        "Socket" => is("socket", meta.is_ok_and(|m| m.file_type().is_socket())),
        "CharDevice" => is(
            "character device",
            meta.is_ok_and(|m| m.file_type().is_char_device()),
        ),
        "BlockDevice" => is(
            "block device",
            meta.is_ok_and(|m| m.file_type().is_block_device()),
        ),
        other => Err(format!("hostPath type {other:?} is not supported")),
    }
}

/// A file of a volume: its bytes and mode.
type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// The files of a ConfigMap, Secret, downward API or projected volume.
async fn files(
    pod: &Value,
    v: &Value,
    ns: &str,
    env: &Env,
    sources: &mut Sources,
) -> Result<Files, String> {
    let mut out = Files::new();
    let default_mode = |s: &Value| {
        s.get("defaultMode")
            .and_then(Value::as_u64)
            .map_or(0o644, |m| m as u32 & 0o777)
    };
    if let Some(p) = v.get("projected") {
        let mode = default_mode(p);
        for s in p
            .get("sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(cm) = s.get("configMap") {
                keyed(&mut out, cm, "configmaps", mode, ns, env, sources).await?;
            } else if let Some(sec) = s.get("secret") {
                keyed(&mut out, sec, "secrets", mode, ns, env, sources).await?;
            } else if let Some(d) = s.get("downwardAPI") {
                downward(&mut out, pod, d, mode, env)?;
            } else {
                return Err(
                    "only configMap, secret and downwardAPI projections are supported".into(),
                );
            }
        }
    } else if let Some(cm) = v.get("configMap") {
        keyed(
            &mut out,
            cm,
            "configmaps",
            default_mode(cm),
            ns,
            env,
            sources,
        )
        .await?;
    } else if let Some(sec) = v.get("secret") {
        // A secret volume names its source `secretName`.
        let mut s = sec.clone();
        if let Some(n) = sec.get("secretName") {
            s["name"] = n.clone();
        }
        keyed(&mut out, &s, "secrets", default_mode(sec), ns, env, sources).await?;
    } else if let Some(d) = v.get("downwardAPI") {
        downward(&mut out, pod, d, default_mode(d), env)?;
    }
    Ok(out)
}

/// The keys of a ConfigMap or Secret (`items` picks and renames them).
async fn keyed(
    out: &mut Files,
    s: &Value,
    kind: &str,
    mode: u32,
    ns: &str,
    env: &Env,
    sources: &mut Sources,
) -> Result<(), String> {
    let name = s.get("name").and_then(Value::as_str).unwrap_or("");
    let optional = s.get("optional").and_then(Value::as_bool) == Some(true);
    let singular = if kind == "secrets" {
        "secret"
    } else {
        "configmap"
    };
    let Some(data) = sources.data(env, ns, kind, name).await? else {
        if optional {
            return Ok(());
        }
        return Err(format!("{singular} {name:?} not found"));
    };
    match s.get("items").and_then(Value::as_array) {
        Some(items) => {
            for item in items {
                let key = item.get("key").and_then(Value::as_str).unwrap_or("");
                let path = item.get("path").and_then(Value::as_str).unwrap_or(key);
                let m = item
                    .get("mode")
                    .and_then(Value::as_u64)
                    .map_or(mode, |m| m as u32 & 0o777);
                match data.get(key) {
                    Some(v) => {
                        out.insert(path.to_string(), (v.clone().into_bytes(), m));
                    }
                    None if optional => {}
                    None => {
                        let what = if kind == "secrets" {
                            "secret"
                        } else {
                            "config"
                        };
                        return Err(format!(
                            "{singular} references non-existent {what} key: {key}"
                        ));
                    }
                }
            }
        }
        None => {
            for (k, v) in data {
                out.insert(k, (v.into_bytes(), mode));
            }
        }
    }
    Ok(())
}

/// Downward API items: pod fields and container resources.
fn downward(out: &mut Files, pod: &Value, d: &Value, mode: u32, env: &Env) -> Result<(), String> {
    for item in d
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let path = item.get("path").and_then(Value::as_str).unwrap_or("");
        let m = item
            .get("mode")
            .and_then(Value::as_u64)
            .map_or(mode, |m| m as u32 & 0o777);
        let value = if let Some(f) = item.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
            let map = |k: &str| -> String {
                pod.pointer(&format!("/metadata/{k}"))
                    .and_then(Value::as_object)
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| format!("{k}={:?}\n", v.as_str().unwrap_or("")))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            match f {
                "metadata.name" => owner::name(pod).to_string(),
                "metadata.namespace" => owner::namespace(pod).unwrap_or("").to_string(),
                "metadata.uid" => owner::uid(pod).to_string(),
                "metadata.labels" => map("labels"),
                "metadata.annotations" => map("annotations"),
                other => {
                    let pick = |k: &str, prefix: &str| {
                        other
                            .strip_prefix(prefix)
                            .and_then(|s| s.strip_suffix("']"))
                            .map(|key| {
                                pod.pointer(&format!("/metadata/{k}"))
                                    .and_then(|l| l.get(key))
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string()
                            })
                    };
                    pick("labels", "metadata.labels['")
                        .or_else(|| pick("annotations", "metadata.annotations['"))
                        .ok_or_else(|| format!("downwardAPI fieldRef {other:?} is not supported"))?
                }
            }
        } else if let Some(r) = item.get("resourceFieldRef") {
            let container = r.get("containerName").and_then(Value::as_str).unwrap_or("");
            let spec = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("name").and_then(Value::as_str) == Some(container))
                })
                .ok_or_else(|| {
                    format!("downwardAPI resourceFieldRef: no container {container:?}")
                })?;
            super::pod::resource_field(spec, r, env)?
        } else {
            return Err(format!(
                "downwardAPI item {path:?} has no fieldRef or resourceFieldRef"
            ));
        };
        out.insert(path.to_string(), (value.into_bytes(), m));
    }
    Ok(())
}

/// Rejects a volume file path that would leave its volume.
fn safe(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Writes `files` into `dir`, each replaced whole, and removes the files no longer there.
fn write_files(dir: &Path, files: &Files) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (path, (bytes, mode)) in files {
        if !safe(path) {
            return Err(format!(
                "invalid path {path:?}: must be relative, without '..'"
            ));
        }
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        if std::fs::read(&target).is_ok_and(|b| b == *bytes) {
            continue;
        }
        let tmp = target.with_file_name(format!(
            "..{}.tmp",
            target
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &target).map_err(|e| e.to_string())?;
    }
    remove_stale(dir, dir, files);
    Ok(())
}

fn remove_stale(root: &Path, dir: &Path, files: &Files) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default();
        if p.is_dir() {
            remove_stale(root, &p, files);
            let _ = std::fs::remove_dir(&p);
        } else if !files.contains_key(&rel) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Where a container path (`mountPath`, `workingDir`) lies under the container's root
/// directory `root` (the process runtime has no image: a container's paths are under its
/// root in the pod's directory).
pub fn under(root: &Path, container_path: &str) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in Path::new(container_path).components() {
        if let std::path::Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

/// A container's `volumeMounts` as [`Mount`]s (`subPath` and `subPathExpr` pick a directory
/// inside a volume, made if missing).
pub fn mounts(
    pod: &Value,
    container: &Value,
    pod_dir: &Path,
    vars: &[(String, String)],
) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for m in container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = m.get("name").and_then(Value::as_str).unwrap_or("");
        let mount_path = m.get("mountPath").and_then(Value::as_str).unwrap_or("");
        let Some(mut from) = source(pod, pod_dir, name) else {
            return Err(format!(
                "volumeMount {name:?}: the pod has no volume {name:?}"
            ));
        };
        let sub = match (
            m.get("subPath").and_then(Value::as_str),
            m.get("subPathExpr").and_then(Value::as_str),
        ) {
            (Some(s), _) if !s.is_empty() => Some(s.to_string()),
            (_, Some(e)) if !e.is_empty() => Some(super::pod::expand(e, vars)),
            _ => None,
        };
        if let Some(sub) = sub {
            if !safe(&sub) {
                return Err(format!(
                    "volumeMount {name:?}: subPath {sub:?} must be relative, without '..'"
                ));
            }
            from = from.join(sub);
            if !from.exists() {
                std::fs::create_dir_all(&from).map_err(|e| format!("{}: {e}", from.display()))?;
            }
        }
        out.push(Mount {
            host_path: from,
            container_path: mount_path.to_string(),
            read_only: m.get("readOnly").and_then(Value::as_bool) == Some(true),
        });
    }
    Ok(out)
}

/// Mounts under the process runtime: a symbolic link per mount under the container's root
/// `root` (read-only is not enforced: there is no mount namespace).
pub fn link(root: &Path, mounts: &[Mount]) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    for m in mounts {
        let at = under(root, &m.container_path);
        if at == root {
            return Err(format!("mountPath {:?} is the root", m.container_path));
        }
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        if std::fs::read_link(&at).is_ok_and(|l| l == m.host_path) {
            continue;
        }
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(&m.host_path, &at)
            .map_err(|e| format!("{}: {e}", at.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_their_volume_and_root() {
        assert!(safe("a/b.txt"));
        assert!(!safe("../x") && !safe("/etc/passwd") && !safe("a/../../b") && !safe(""));
        let root = Path::new("/p/c/rootfs");
        assert_eq!(under(root, "/etc/config"), root.join("etc/config"));
        assert_eq!(under(root, "/../../x"), root.join("x"));
    }

    #[test]
    fn files_are_replaced_whole_and_stale_ones_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut f = Files::new();
        f.insert("a".into(), (b"1".to_vec(), 0o400));
        f.insert("sub/b".into(), (b"2".to_vec(), 0o644));
        write_files(dir.path(), &f).unwrap();
        assert_eq!(std::fs::read(dir.path().join("sub/b")).unwrap(), b"2");
        let mode = std::fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        f.remove("sub/b");
        f.insert("a".into(), (b"3".to_vec(), 0o400));
        write_files(dir.path(), &f).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"3");
        assert!(!dir.path().join("sub").exists());
        let mut bad = Files::new();
        bad.insert("../escape".into(), (Vec::new(), 0o644));
        assert!(write_files(dir.path(), &bad).is_err());
    }
}
