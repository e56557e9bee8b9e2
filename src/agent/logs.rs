//! The agent's `/containerLogs/<namespace>/<pod>/<container>` endpoint (what the API server's
//! `pods/log` proxies to): a container's output from its CRI-format log file, with
//! `tailLines`, `limitBytes`, `timestamps` and `follow`.
//!
//! Owns nothing: it reads the files the runtime writes. A followed stream ends when the
//! client goes away or the pod's directory is removed; its buffer is bounded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::http::{channel_body, text, Body};

/// One CRI log line rendered for a client.
fn render(line: &str, timestamps: bool) -> Option<String> {
    let mut parts = line.splitn(4, ' ');
    let (ts, _stream, tag, rest) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next().unwrap_or(""),
    );
    let end = if tag == "P" { "" } else { "\n" };
    Some(if timestamps {
        format!("{ts} {rest}{end}")
    } else {
        format!("{rest}{end}")
    })
}

/// Most bytes a followed log reads per look.
const FOLLOW_CHUNK: u64 = 1 << 20;

/// A log followed through one open file: what was written before the file was rotated
/// away, or removed with its pod, is still read to the end.
struct Follower {
    path: PathBuf,
    file: std::fs::File,
    pos: u64,
}

impl Follower {
    fn open(path: &Path) -> Option<Follower> {
        Some(Follower {
            path: path.to_path_buf(),
            file: std::fs::File::open(path).ok()?,
            pos: 0,
        })
    }

    /// Up to [`FOLLOW_CHUNK`] bytes of whole lines written since the last read.
    fn read(&mut self) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut out = Vec::new();
        if self.file.seek(SeekFrom::Start(self.pos)).is_err() {
            return out;
        }
        let _ = (&mut self.file).take(FOLLOW_CHUNK).read_to_end(&mut out);
        let whole = out.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        out.truncate(whole);
        self.pos += whole as u64;
        out
    }

    /// Moves to the file now at the path if the one being read was rotated away.
    /// Everything there is now (whole lines), however long.
    fn read_all(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let chunk = self.read();
            if chunk.is_empty() {
                return all;
            }
            all.extend_from_slice(&chunk);
        }
    }

    fn follow_rotation(&mut self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.path).map(|m| m.ino());
        let open = self.file.metadata().map(|m| m.ino());
        match (now, open) {
            (Ok(a), Ok(b)) if a != b => match std::fs::File::open(&self.path) {
                Ok(f) => {
                    self.file = f;
                    self.pos = 0;
                    true
                }
                Err(_) => false,
            },
            _ => false,
        }
    }
}

/// A container's run logs (`<n>.log` in its log directory), oldest first.
fn runs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_suffix(".log")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest directory of pod `ns/name` under `pods_dir`.
pub(super) fn pod_dir(pods_dir: &Path, ns: &str, name: &str) -> Option<PathBuf> {
    let prefix = format!("{ns}_{name}_");
    std::fs::read_dir(pods_dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Serves one request for a container's log.
pub fn serve(pods_dir: &Path, path: &str, query: &str) -> http::Response<Body> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [_, ns, pod, container] = parts[..] else {
        return text(
            StatusCode::NOT_FOUND,
            "expected /containerLogs/<namespace>/<pod>/<container>\n",
        );
    };
    let params: HashMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let flag = |k: &str| matches!(params.get(k).map(String::as_str), Some("true" | "1"));
    let number = |k: &str| params.get(k).and_then(|v| v.parse::<u64>().ok());
    let (timestamps, follow) = (flag("timestamps"), flag("follow"));
    let Some(dir) = pod_dir(pods_dir, ns, pod) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} has not run on this node\n"),
        );
    };
    let all_runs = runs(&dir.join(container));
    let previous = flag("previous");
    let file = if previous {
        match all_runs.len() {
            n if n >= 2 => all_runs[n - 2].1.clone(),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "previous terminated container {container:?} in pod {pod:?} not found\n"
                    ),
                )
            }
        }
    } else {
        match all_runs.last() {
            Some((_, f)) => f.clone(),
            None => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("container {container:?} in pod {ns}/{pod} has not started\n"),
                )
            }
        }
    };
    let Some(mut follower) = Follower::open(&file) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} in pod {ns}/{pod} has not started\n"),
        );
    };
    let content = follower.read_all();
    // `sinceSeconds` or `sinceTime` (RFC 3339): lines logged at or after that second.
    let since = number("sinceSeconds")
        .map(|n| crate::api::meta::rfc3339(crate::api::meta::now_secs().saturating_sub(n)))
        .or_else(|| params.get("sinceTime").map(|t| t.replace("%3A", ":")));
    let since = since.map(|t| t.chars().take(19).collect::<String>());
    let lines: Vec<String> = String::from_utf8_lossy(&content)
        .lines()
        .filter(|l| {
            since
                .as_ref()
                .is_none_or(|t| l.get(..19).is_some_and(|ts| ts >= t.as_str()))
        })
        .filter_map(|l| render(l, timestamps))
        .collect();
    let skip = number("tailLines").map_or(0, |n| lines.len().saturating_sub(n as usize));
    let mut out: String = lines[skip..].concat();
    let limit = number("limitBytes");
    if let Some(l) = limit {
        let mut cut = (l as usize).min(out.len());
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    if !follow || previous {
        return text(StatusCode::OK, out);
    }
    let ended_file = dir.join(format!("{container}.ended"));
    let container_dir = dir.join(container);
    let run = all_runs.last().map_or(0, |(n, _)| *n);
    let (tx, body) = channel_body(16);
    tokio::spawn(async move {
        if tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tx.is_closed() {
                return;
            }
            // The stream ends with the container: once it has exited (or run again, or its
            // pod is gone) and everything it wrote has been sent.
            let ended = !dir.exists()
                || ended_file.exists()
                || runs(&container_dir).last().is_some_and(|(n, _)| *n > run);
            let fresh = follower.read();
            if fresh.is_empty() {
                if follower.follow_rotation() {
                    continue;
                }
                if ended {
                    return;
                }
                continue;
            }
            let chunk: String = String::from_utf8_lossy(&fresh)
                .lines()
                .filter_map(|l| render(l, timestamps))
                .collect();
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
        }
    });
    http::Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(body)
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_lines_render_with_and_without_timestamps() {
        let l = "2026-11-25T10:00:00.000000001Z stdout F hello world";
        assert_eq!(render(l, false).unwrap(), "hello world\n");
        assert_eq!(
            render(l, true).unwrap(),
            "2026-11-25T10:00:00.000000001Z hello world\n"
        );
        assert_eq!(render("t stderr P part", false).unwrap(), "part");
    }

    #[test]
    fn a_follower_reads_appended_lines_through_rotation_and_removal() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "a\n").unwrap();
        let mut f = Follower::open(&path).unwrap();
        assert_eq!(f.read_all(), b"a\n");
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"b\nc").unwrap();
        assert_eq!(f.read(), b"b\n", "only whole lines");
        assert_eq!(f.read(), b"");
        // Rotated away: the rest of the old file first, then the new one.
        w.write_all(b"\n").unwrap();
        std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        std::fs::write(&path, "d\n").unwrap();
        assert_eq!(f.read(), b"c\n");
        assert!(f.follow_rotation());
        assert_eq!(f.read(), b"d\n");
        // Removed (the pod deleted): what was written is still read.
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b"e\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!f.follow_rotation());
        assert_eq!(f.read(), b"e\n");
        assert!(Follower::open(&dir.path().join("missing.log")).is_none());
    }
}
