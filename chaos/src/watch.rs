//! The watch workload and its checker: clients watching the workload's keys through random
//! replicas, resuming after every error, checked against etcd's watch guarantees.
//!
//! Each watcher watches the prefix [`crate::kv::PREFIX`] from revision 1. When its stream
//! breaks (a replica killed, paused, cut off) it reconnects to another replica from the
//! revision after the last one it saw. After the faults heal, every watcher reads on until
//! the head revision, and one more watch from revision 1 on a healthy replica gives the
//! reference history. The checks, per watcher:
//! - **ordered and unique**: revisions strictly increase (a revision's events together);
//! - **atomic**: all events of one revision arrive in the same response;
//! - **no gaps, resumable, every committed write seen**: the concatenation of everything
//!   it received equals the reference history, event for event.

use std::time::{Duration, Instant};

use flotilla::client::{Client, ClientError};
use flotilla::gateway::json::{Event, WatchCreateRequest, WatchLine, WatchRequest};
use http_body_util::BodyExt;
use serde::Serialize;

/// One event as the checker compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    /// The event's revision (its key's mod revision).
    pub revision: i64,
    /// `PUT` or `DELETE`.
    pub kind: String,
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

impl From<&Event> for Seen {
    fn from(e: &Event) -> Seen {
        Seen {
            revision: e.kv.mod_revision,
            kind: e.kind.clone(),
            key: String::from_utf8_lossy(&e.kv.key).into_owned(),
            value: String::from_utf8_lossy(&e.kv.value).into_owned(),
        }
    }
}

/// What one watcher received.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Received {
    /// Every event, in arrival order.
    pub events: Vec<Seen>,
    /// Revisions whose events were split over two responses.
    pub split_revisions: Vec<i64>,
    /// Streams opened (1 + reconnections).
    pub streams: u32,
}

/// Reads one watch stream from `server` starting at `from` into `got` until `stop` says so
/// (checked between responses), the stream ends or fails, or `deadline` passes. Returns
/// the next revision to resume from.
async fn stream(
    client: &Client,
    server: &str,
    from: i64,
    got: &mut Received,
    deadline: Instant,
    mut stop: impl FnMut(i64) -> bool,
) -> Result<i64, ClientError> {
    let req = WatchRequest {
        create_request: WatchCreateRequest {
            key: crate::kv::PREFIX.as_bytes().to_vec(),
            range_end: crate::kv::prefix_end(),
            start_revision: from,
            ..Default::default()
        },
    };
    let body = serde_json::to_vec(&req).expect("serializes");
    let resp = client.post_raw(server, "/v3/watch", body, None).await?;
    if resp.status() != 200 {
        return Err(ClientError::Protocol {
            server: server.into(),
            detail: format!("watch answered {}", resp.status()),
        });
    }
    got.streams += 1;
    let mut next = from;
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut last_response_revisions: Vec<i64> = Vec::new();
    loop {
        if stop(next) || Instant::now() > deadline {
            return Ok(next);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        // A quiet stream still answers every few seconds (progress), so a short wait
        // distinguishes a live stream from a dead one.
        let frame = match tokio::time::timeout(left.min(Duration::from_secs(3)), body.frame()).await
        {
            Err(_) => return Ok(next),
            Ok(None) => return Ok(next),
            Ok(Some(Err(_))) => return Ok(next),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(line) = serde_json::from_slice::<WatchLine>(&line) else {
                continue;
            };
            let r = line.result;
            if r.canceled {
                return Ok(next);
            }
            let mut revisions: Vec<i64> = Vec::new();
            for e in &r.events {
                let seen = Seen::from(e);
                if revisions.last() != Some(&seen.revision) {
                    revisions.push(seen.revision);
                }
                next = next.max(seen.revision + 1);
                got.events.push(seen);
            }
            // A revision that continues from the previous response was split.
            if let (Some(first), Some(prev)) = (revisions.first(), last_response_revisions.last()) {
                if first == prev {
                    got.split_revisions.push(*first);
                }
            }
            if !revisions.is_empty() {
                last_response_revisions = revisions;
            }
        }
    }
}

/// Runs one watcher until `until`, reconnecting through random replicas.
pub async fn run_watcher(
    id: u32,
    seed: u64,
    servers: Vec<String>,
    until: Instant,
    timeout: Duration,
) -> (Received, i64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5741_5443 ^ u64::from(id));
    let client = Client::new(servers.clone(), timeout);
    let mut got = Received::default();
    let mut next = 1;
    while Instant::now() < until {
        let server = &servers[rng.gen_range(0..servers.len())];
        match stream(&client, server, next, &mut got, until, |_| false).await {
            Ok(n) => next = n,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    (got, next)
}

/// Reads on from `next` until the stream has delivered every revision up to `head`
/// (through any replica, retrying), within `patience`.
pub async fn catch_up(
    servers: &[String],
    got: &mut Received,
    mut next: i64,
    head: i64,
    patience: Duration,
) -> Result<(), String> {
    let client = Client::new(servers.to_vec(), Duration::from_secs(5));
    let deadline = Instant::now() + patience;
    let mut i = 0;
    while next <= head {
        if Instant::now() > deadline {
            return Err(format!(
                "the watch did not reach revision {head} within {patience:?} (stopped at {})",
                next - 1
            ));
        }
        let server = &servers[i % servers.len()];
        i += 1;
        match stream(&client, server, next, got, deadline, |n| n > head).await {
            Ok(n) => next = n,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}

/// The reference history: every event under the prefix from revision 1 to `head`.
pub async fn reference(servers: &[String], head: i64) -> Result<Vec<Seen>, String> {
    let mut got = Received::default();
    catch_up(servers, &mut got, 1, head, Duration::from_secs(30)).await?;
    got.events.retain(|e| e.revision <= head);
    Ok(got.events)
}

/// Checks one watcher's events against the reference; returns what is wrong.
pub fn check(id: u32, got: &Received, truth: &[Seen], head: i64) -> Vec<String> {
    let mut problems = Vec::new();
    let events: Vec<&Seen> = got.events.iter().filter(|e| e.revision <= head).collect();
    if let Some(w) = events.windows(2).find(|w| w[1].revision < w[0].revision) {
        problems.push(format!(
            "watcher {id}: revision {} arrived after {} (out of order)",
            w[1].revision, w[0].revision
        ));
    }
    if let Some(e) = events.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]) {
        problems.push(format!("watcher {id}: {e:?} delivered twice"));
    }
    if !got.split_revisions.is_empty() {
        problems.push(format!(
            "watcher {id}: revisions split over two responses: {:?}",
            got.split_revisions
        ));
    }
    if events.len() != truth.len() || events.iter().zip(truth).any(|(a, b)| **a != *b) {
        let first_diff = events
            .iter()
            .zip(truth)
            .position(|(a, b)| *a != b)
            .unwrap_or(events.len().min(truth.len()));
        problems.push(format!(
            "watcher {id}: received {} events, the history has {}; first difference at #{first_diff}: got {:?}, expected {:?}",
            events.len(),
            truth.len(),
            events.get(first_diff),
            truth.get(first_diff)
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: i64, value: &str) -> Seen {
        Seen {
            revision,
            kind: "PUT".into(),
            key: "chaos/0".into(),
            value: value.into(),
        }
    }

    fn truth() -> Vec<Seen> {
        (1..=5).map(|r| ev(r, &format!("v{r}"))).collect()
    }

    fn got(events: Vec<Seen>) -> Received {
        Received {
            events,
            split_revisions: vec![],
            streams: 1,
        }
    }

    #[test]
    fn the_exact_history_passes() {
        assert!(check(0, &got(truth()), &truth(), 5).is_empty());
        // Events past the head are not compared.
        let mut more = truth();
        more.push(ev(6, "v6"));
        assert!(check(0, &got(more), &truth(), 5).is_empty());
    }

    #[test]
    fn a_gap_a_duplicate_a_reordering_a_wrong_value_and_a_split_are_caught() {
        let mut gap = truth();
        gap.remove(2);
        assert!(!check(0, &got(gap), &truth(), 5).is_empty());
        let mut dup = truth();
        dup.insert(3, ev(3, "v3"));
        assert!(!check(0, &got(dup), &truth(), 5).is_empty());
        let mut swapped = truth();
        swapped.swap(1, 2);
        assert!(!check(0, &got(swapped), &truth(), 5).is_empty());
        let mut wrong = truth();
        wrong[4].value = "other".into();
        assert!(!check(0, &got(wrong), &truth(), 5).is_empty());
        let mut split = got(truth());
        split.split_revisions.push(3);
        assert!(!check(0, &split, &truth(), 5).is_empty());
        // Missing the tail (the watcher never caught up) is a gap too.
        assert!(!check(0, &got(truth()[..3].to_vec()), &truth(), 5).is_empty());
    }
}
