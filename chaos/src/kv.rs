//! The key-value register workload: clients reading, writing and compare-and-swapping a
//! few keys through random replicas, recording every operation for the checker.
//!
//! Each client has one request outstanding at a time and a seeded random stream of its
//! own. Every value written is unique (`<client>-<n>`), so a read names the write it saw.
//! An answer is classified by what it proves: a success is recorded with its output; a
//! refusal that certainly changed nothing (connection refused, `503`: no leader, no
//! quorum) is not recorded at all; anything else (a timeout, a broken connection, another
//! error) is recorded as indeterminate when the operation could have written.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::client::{Client, ClientError};
use flotilla::gateway::json::{
    Compare, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest,
    TxnResponse,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::linearizability::{Input, Operation, Output};

/// The prefix of every key the workload touches.
pub const PREFIX: &str = "chaos/";

/// The exclusive end of the range of keys under [`PREFIX`].
pub fn prefix_end() -> Vec<u8> {
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("prefix is not empty") += 1;
    end
}

/// Counts of what happened to the workload's requests.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// Answered: the outcome is known.
    pub ok: u64,
    /// Refused before taking effect (not in the history).
    pub refused: u64,
    /// Outcome unknown (in the history as indeterminate writes; dropped reads).
    pub indeterminate: u64,
}

/// The shared record of a run.
#[derive(Default)]
pub struct Recorder {
    /// Every operation that may have taken effect.
    pub ops: Mutex<Vec<Operation>>,
    /// Request outcomes.
    pub counts: Mutex<Counts>,
}

enum Outcome<T> {
    Ok(T),
    Refused,
    Unknown,
}

fn classify<T>(r: Result<T, ClientError>) -> Outcome<T> {
    match r {
        Ok(v) => Outcome::Ok(v),
        Err(ClientError::Unavailable(_)) => Outcome::Refused,
        Err(ClientError::Api { status: 503, .. }) => Outcome::Refused,
        Err(_) => Outcome::Unknown,
    }
}

/// Microseconds since `start`.
pub fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// The key-value workload's knobs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Concurrent clients.
    pub clients: u32,
    /// Keys (registers).
    pub keys: u32,
    /// Per-request client timeout.
    pub timeout: Duration,
}

/// A linearizable read of `key` from `server`.
pub async fn read(client: &Client, server: &str, key: &str) -> Result<Option<String>, ClientError> {
    let req = RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    };
    let resp: RangeResponse = client.post_to(server, "/v3/kv/range", &req).await?;
    Ok(resp
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// The revision of the last change under [`PREFIX`] (the workload never deletes, so it is
/// the newest key's mod revision), read linearizably from `server`, retried while refused.
pub async fn head_revision(client: &Client, server: &str) -> Result<i64, ClientError> {
    let req = RangeRequest {
        key: PREFIX.as_bytes().to_vec(),
        range_end: prefix_end(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .post_to::<_, RangeResponse>(server, "/v3/kv/range", &req)
            .await
        {
            Ok(r) => return Ok(r.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0)),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs client `id` until `until`, recording into `rec`.
#[allow(clippy::too_many_arguments)]
pub async fn run_client(
    id: u32,
    seed: u64,
    w: Workload,
    servers: Vec<String>,
    start: Instant,
    until: Instant,
    rec: Arc<Recorder>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(id) << 32) ^ 0x9e37_79b9);
    let client = Client::new(servers.clone(), w.timeout);
    let mut seen: Vec<Option<String>> = vec![None; w.keys as usize];
    let mut n = 0u64;
    while Instant::now() < until {
        let k = rng.gen_range(0..w.keys) as usize;
        let key = format!("{PREFIX}{k}");
        let server = &servers[rng.gen_range(0..servers.len())];
        let roll = rng.gen_range(0..100);
        n += 1;
        let value = format!("{id}-{n}");
        let call_us = micros(start);
        let (input, outcome): (Input, Outcome<Output>) = if roll < 45 {
            let r = classify(read(&client, server, &key).await);
            if let Outcome::Ok(v) = &r {
                seen[k] = v.clone();
            }
            (Input::Read, map(r, Output::Read))
        } else if roll < 75 || seen[k].is_none() {
            let req = PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                ..Default::default()
            };
            let r = classify(
                client
                    .post_to::<_, PutResponse>(server, "/v3/kv/put", &req)
                    .await,
            );
            (Input::Write(value.clone()), map(r, |_| Output::Written))
        } else {
            let from = seen[k].clone().unwrap_or_default();
            let req = TxnRequest {
                compare: vec![Compare {
                    result: Some("EQUAL".into()),
                    target: Some("VALUE".into()),
                    key: key.as_bytes().to_vec(),
                    value: from.as_bytes().to_vec(),
                    ..Default::default()
                }],
                success: vec![RequestOp {
                    request_put: Some(PutRequest {
                        key: key.as_bytes().to_vec(),
                        value: value.as_bytes().to_vec(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                failure: vec![],
            };
            let r = classify(
                client
                    .post_to::<_, TxnResponse>(server, "/v3/kv/txn", &req)
                    .await,
            );
            (
                Input::Cas {
                    from,
                    to: value.clone(),
                },
                map(r, |t| Output::Cas(t.succeeded)),
            )
        };
        let return_us = micros(start);
        let is_read = matches!(input, Input::Read);
        let (ret, output) = match outcome {
            Outcome::Ok(out) => {
                rec.counts.lock().expect("not poisoned").ok += 1;
                (Some(return_us), out)
            }
            Outcome::Refused => {
                rec.counts.lock().expect("not poisoned").refused += 1;
                // Nothing happened; back off a little so a down cluster is not hammered.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Outcome::Unknown => {
                rec.counts.lock().expect("not poisoned").indeterminate += 1;
                if is_read {
                    continue;
                }
                (None, Output::Unknown)
            }
        };
        rec.ops.lock().expect("not poisoned").push(Operation {
            client: id,
            server: server.clone(),
            key,
            input,
            call_us,
            return_us: ret,
            output,
        });
    }
}

fn map<T>(o: Outcome<T>, f: impl FnOnce(T) -> Output) -> Outcome<Output> {
    match o {
        Outcome::Ok(v) => Outcome::Ok(f(v)),
        Outcome::Refused => Outcome::Refused,
        Outcome::Unknown => Outcome::Unknown,
    }
}
