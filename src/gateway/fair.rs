//! Per-client limits on the Kubernetes API, so one client cannot starve the others: a token
//! bucket of requests per second, a bound on its requests in flight and one on its open
//! watches. A client is an authenticated user (they apply only with authentication on);
//! `system:masters` is exempt, as Kubernetes' priority and fairness exempts it.
//!
//! Owns the table of clients. Invariants: a refused request did no work (it is refused
//! before it is handled); the table is bounded ([`MAX_CLIENTS`]: idle clients are dropped
//! when it fills, and past it unknown clients share one entry); a watch's permit lives as
//! long as its stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most clients tracked at once.
pub const MAX_CLIENTS: usize = 10_000;
/// A client unseen this long may be forgotten.
const IDLE: Duration = Duration::from_secs(300);

/// The limits; 0 turns one off.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per second, sustained.
    pub qps: f64,
    /// Requests at once above the rate.
    pub burst: f64,
    /// Requests being handled at once.
    pub inflight: usize,
    /// Watches open at once.
    pub watches: usize,
}

struct Client {
    tokens: f64,
    last: Instant,
    inflight: Arc<Semaphore>,
    watches: Arc<Semaphore>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the rate.
    Rate,
    /// Too many requests in flight.
    InFlight,
    /// Too many watches open.
    Watches,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate => "client_rate",
            Refusal::InFlight => "client_inflight",
            Refusal::Watches => "client_watches",
        }
    }

    /// The Status message.
    pub fn message(self, user: &str) -> String {
        match self {
            Refusal::Rate => format!(
                "too many requests from {user:?}: over its requests per second; please try again later"
            ),
            Refusal::InFlight => format!(
                "too many requests from {user:?} at once; please try again later"
            ),
            Refusal::Watches => format!("too many watches open by {user:?}"),
        }
    }
}

/// What an admitted request holds until it is done (its watch permit: until its stream
/// ends).
pub struct Admitted {
    /// Released when the request has been handled.
    pub inflight: Option<OwnedSemaphorePermit>,
    /// Released when the watch stream ends.
    pub watch: Option<OwnedSemaphorePermit>,
}

/// The per-client limiter of one replica.
pub struct Fair {
    limits: Limits,
    clients: Mutex<HashMap<String, Client>>,
}

/// Past [`MAX_CLIENTS`], new clients share this entry.
const OVERFLOW: &str = "\0overflow";

impl Fair {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> Fair {
        Fair {
            limits,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a request of `user` (a watch if `watch`), or says why not.
    pub fn admit(&self, user: &str, watch: bool) -> Result<Admitted, Refusal> {
        let l = self.limits;
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if !clients.contains_key(user) && clients.len() >= MAX_CLIENTS {
            // Forget idle clients, but never one still holding a permit (an open watch
            // would otherwise get a fresh cap).
            let (inflight, watches) = (l.inflight.max(1), l.watches.max(1));
            clients.retain(|_, c| {
                now.duration_since(c.last) < IDLE
                    || c.inflight.available_permits() < inflight
                    || c.watches.available_permits() < watches
            });
        }
        let key = if clients.contains_key(user) || clients.len() < MAX_CLIENTS {
            user
        } else {
            OVERFLOW
        };
        let c = clients.entry(key.to_string()).or_insert_with(|| Client {
            tokens: l.burst.max(1.0),
            last: now,
            inflight: Arc::new(Semaphore::new(l.inflight.max(1))),
            watches: Arc::new(Semaphore::new(l.watches.max(1))),
        });
        if l.qps > 0.0 {
            let burst = l.burst.max(1.0);
            c.tokens = (c.tokens + now.duration_since(c.last).as_secs_f64() * l.qps).min(burst);
            c.last = now;
            if c.tokens < 1.0 {
                return Err(Refusal::Rate);
            }
        }
        c.last = now;
        let inflight = if l.inflight > 0 {
            Some(
                c.inflight
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::InFlight)?,
            )
        } else {
            None
        };
        let watch = if watch && l.watches > 0 {
            Some(
                c.watches
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Watches)?,
            )
        } else {
            None
        };
        if l.qps > 0.0 {
            c.tokens -= 1.0;
        }
        Ok(Admitted { inflight, watch })
    }
}

/// A response body that holds a permit until it ends (a watch's).
pub struct Guarded {
    inner: crate::http::Body,
    _permit: OwnedSemaphorePermit,
}

impl Guarded {
    /// `inner`, holding `permit` while it is read.
    pub fn new(inner: crate::http::Body, permit: OwnedSemaphorePermit) -> Guarded {
        Guarded {
            inner,
            _permit: permit,
        }
    }
}

impl hyper::body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_rate_inflight_and_watches() {
        let f = Fair::new(Limits {
            qps: 1.0,
            burst: 3.0,
            inflight: 2,
            watches: 1,
        });
        let a1 = f.admit("a", false).unwrap();
        let a2 = f.admit("a", false).unwrap();
        assert_eq!(f.admit("a", false).err(), Some(Refusal::InFlight));
        drop(a1);
        let a3 = f.admit("a", false).unwrap();
        drop((a2, a3));
        // Three tokens were spent; the fourth request is over the rate.
        assert_eq!(f.admit("a", false).err(), Some(Refusal::Rate));
        // Another client is not affected.
        let w = f.admit("b", true).unwrap();
        assert!(w.watch.is_some());
        drop(w.inflight);
        assert_eq!(f.admit("b", true).err(), Some(Refusal::Watches));
        drop(w.watch);
        assert!(f.admit("b", true).is_ok());
    }

    #[test]
    fn the_table_is_bounded() {
        let f = Fair::new(Limits {
            qps: 0.0,
            burst: 0.0,
            inflight: 1,
            watches: 0,
        });
        let mut held = Vec::new();
        for i in 0..MAX_CLIENTS {
            held.push(f.admit(&format!("u{i}"), false).unwrap());
        }
        // Past the bound, new clients share one entry (and its in-flight bound).
        let first = f.admit("late-1", false).unwrap();
        assert_eq!(f.admit("late-2", false).err(), Some(Refusal::InFlight));
        drop(first);
        assert_eq!(
            f.clients.lock().unwrap().len(),
            MAX_CLIENTS + 1,
            "the overflow entry"
        );
    }
}
