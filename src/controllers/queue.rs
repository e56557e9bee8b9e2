//! Work queues and expectations for the control loops (client-go's workqueue and
//! controller expectations).
//!
//! [`Queue`] owns the set of keys waiting to be reconciled. Invariants:
//! - a key is queued at most once, however often it is added (de-duplication);
//! - a key is never handed to two workers at once: added while being processed, it is
//!   queued again when the worker is done;
//! - a failing key is retried after an exponential backoff (5 ms doubling to 60 s), reset
//!   by [`Queue::forget`]; delayed keys are bounded by the number of distinct keys;
//! - keys added in the background (inside [`background`]: a new subscriber told of every
//!   cached object, a resync) wait behind keys added for a change, which are handed out
//!   first, save every [`BACKLOG_TURN`]th key while both wait (neither starves). A new
//!   leader's backlog of every object thus does not delay its answer to what changes now.
//!
//! [`Expectations`] owns, per owner, the creations and deletions a controller has asked for
//! and not yet seen in its informer. While they are outstanding the controller does not act
//! on the owner's replica count again, so it cannot create the same pod twice while its own
//! writes are in flight. They expire after [`EXPECTATIONS_TTL`], a safety net for a lost
//! event.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Longest retry backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// First retry backoff.
pub const BASE_BACKOFF: Duration = Duration::from_millis(5);
/// While both wait, one key in this many is a background key.
pub const BACKLOG_TURN: u32 = 8;

thread_local! {
    static BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`; the keys it adds to any queue (on this thread) are background keys.
pub fn background<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BACKGROUND.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(BACKGROUND.with(|b| b.replace(true)));
    f()
}

fn in_background() -> bool {
    BACKGROUND.with(|b| b.get())
}

#[derive(Default)]
struct State {
    /// Keys added for a change, in order.
    ready: VecDeque<String>,
    /// Keys added in the background, in order. May hold keys that moved to `ready` (or
    /// were handed out) since: those are skipped.
    backlog: VecDeque<String>,
    /// Every queued key: true if it waits in `ready`, false if in `backlog`.
    queued: HashMap<String, bool>,
    processing: HashSet<String>,
    /// Added while processing: queue again when done (true: for a change).
    dirty: HashMap<String, bool>,
    /// Keys handed out from `ready` since the last from `backlog`.
    turn: u32,
    failures: HashMap<String, u32>,
    delayed: BinaryHeap<Reverse<(Instant, String)>>,
    /// The earliest time each delayed key is due (later duplicates are dropped).
    due: HashMap<String, Instant>,
    shut: bool,
}

/// A de-duplicating, rate-limited work queue of keys.
#[derive(Default)]
pub struct Queue {
    state: Mutex<State>,
    notify: Notify,
    /// Counts adds once the queue is driven (see [`Queue::count_adds`]).
    adds: std::sync::OnceLock<prometheus::IntCounter>,
}

impl Queue {
    /// Counts every later add (immediate or delayed) in `counter`; the first call wins.
    pub fn count_adds(&self, counter: prometheus::IntCounter) {
        let _ = self.adds.set(counter);
    }

    fn counted(&self) {
        if let Some(c) = self.adds.get() {
            c.inc();
        }
    }

    /// Queues `key` (no-op if already queued).
    pub fn add(&self, key: &str) {
        self.counted();
        let live = !in_background();
        let mut s = self.state.lock().expect("not poisoned");
        Self::add_locked(&mut s, key, live);
        drop(s);
        self.notify.notify_one();
    }

    fn add_locked(s: &mut State, key: &str, live: bool) {
        if s.shut {
            return;
        }
        if s.processing.contains(key) {
            *s.dirty.entry(key.to_string()).or_insert(live) |= live;
            return;
        }
        match s.queued.get_mut(key) {
            // Waiting in the backlog: a change moves it ahead (its backlog entry is skipped).
            Some(in_ready) if live && !*in_ready => {
                *in_ready = true;
                s.ready.push_back(key.to_string());
            }
            Some(_) => {}
            None => {
                s.queued.insert(key.to_string(), live);
                if live {
                    s.ready.push_back(key.to_string());
                } else {
                    s.backlog.push_back(key.to_string());
                }
            }
        }
    }

    /// Takes the next key to hand out: from `ready` first, from `backlog` every
    /// [`BACKLOG_TURN`]th time or when `ready` is empty.
    fn pop_locked(s: &mut State) -> Option<String> {
        loop {
            let from_backlog =
                !s.backlog.is_empty() && (s.ready.is_empty() || s.turn + 1 >= BACKLOG_TURN);
            let key = if from_backlog {
                let k = s.backlog.pop_front()?;
                // Skip entries that moved ahead or were handed out since.
                if s.queued.get(&k) != Some(&false) {
                    continue;
                }
                s.turn = 0;
                k
            } else {
                let k = s.ready.pop_front()?;
                s.turn = s.turn.saturating_add(1);
                k
            };
            s.queued.remove(&key);
            s.processing.insert(key.clone());
            return Some(key);
        }
    }

    /// Queues `key` after `delay` (the earliest of several requests wins).
    pub fn add_after(&self, key: &str, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        self.counted();
        let at = Instant::now() + delay;
        let mut s = self.state.lock().expect("not poisoned");
        if s.shut {
            return;
        }
        let earlier = s.due.get(key).is_some_and(|d| *d <= at);
        if !earlier {
            s.due.insert(key.to_string(), at);
            s.delayed.push(Reverse((at, key.to_string())));
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Retries `key` after its next backoff.
    pub fn retry(&self, key: &str) -> Duration {
        let delay = {
            let mut s = self.state.lock().expect("not poisoned");
            let n = s.failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            backoff(*n)
        };
        self.add_after(key, delay);
        delay
    }

    /// Resets `key`'s backoff (it succeeded).
    pub fn forget(&self, key: &str) {
        self.state
            .lock()
            .expect("not poisoned")
            .failures
            .remove(key);
    }

    /// Marks `key` done; queues it again if it was added meanwhile.
    pub fn done(&self, key: &str) {
        let mut s = self.state.lock().expect("not poisoned");
        s.processing.remove(key);
        if let Some(live) = s.dirty.remove(key) {
            Self::add_locked(&mut s, key, live);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Stops handing out keys; [`Queue::next`] returns `None` from now on.
    pub fn shut_down(&self) {
        self.state.lock().expect("not poisoned").shut = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Keys waiting (ready or delayed).
    pub fn len(&self) -> usize {
        let s = self.state.lock().expect("not poisoned");
        s.queued.len() + s.due.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves delayed keys that are due to the ready queue (an entry superseded by an earlier
    /// due time for the same key is dropped).
    fn promote_due(s: &mut State) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = s.delayed.peek() {
            if *at > now {
                break;
            }
            let Reverse((at, key)) = s.delayed.pop().expect("peeked");
            if s.due.get(&key) == Some(&at) {
                s.due.remove(&key);
                // A retry or a requested requeue: due now, ahead of the backlog.
                Self::add_locked(s, &key, true);
            }
        }
    }

    /// The next ready key, without waiting (delayed keys that are due count as ready).
    pub fn try_next(&self) -> Option<String> {
        let mut s = self.state.lock().expect("not poisoned");
        if s.shut {
            return None;
        }
        Self::promote_due(&mut s);
        Self::pop_locked(&mut s)
    }

    /// The next key to process, waiting for one; `None` once shut down.
    pub async fn next(&self) -> Option<String> {
        loop {
            let wait_until = {
                let mut s = self.state.lock().expect("not poisoned");
                if s.shut {
                    return None;
                }
                Self::promote_due(&mut s);
                if let Some(key) = Self::pop_locked(&mut s) {
                    // Another worker may be waiting for the rest.
                    if !s.queued.is_empty() {
                        self.notify.notify_one();
                    }
                    return Some(key);
                }
                s.delayed.peek().map(|Reverse((at, _))| *at)
            };
            match wait_until {
                Some(at) => {
                    tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.notify.notified().await,
            }
        }
    }
}

/// The backoff after `failures` failures.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    BASE_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF)
}

/// How long unmet expectations hold back an owner.
pub const EXPECTATIONS_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Expected {
    adds: i64,
    dels: i64,
    set: Instant,
}

/// Creations and deletions in flight, per owner key.
#[derive(Default)]
pub struct Expectations {
    map: Mutex<HashMap<String, Expected>>,
}

impl Expectations {
    /// The owner will see `adds` creations and `dels` deletions of its pods.
    pub fn expect(&self, owner: &str, adds: i64, dels: i64) {
        self.map.lock().expect("not poisoned").insert(
            owner.to_string(),
            Expected {
                adds,
                dels,
                set: Instant::now(),
            },
        );
    }

    /// One expected creation was seen (or failed, so will never be seen).
    pub fn created(&self, owner: &str) {
        if let Some(e) = self.map.lock().expect("not poisoned").get_mut(owner) {
            e.adds -= 1;
        }
    }

    /// One expected deletion was seen (or failed).
    pub fn deleted(&self, owner: &str) {
        if let Some(e) = self.map.lock().expect("not poisoned").get_mut(owner) {
            e.dels -= 1;
        }
    }

    /// True if nothing is in flight for `owner` (or what was has expired).
    pub fn satisfied(&self, owner: &str) -> bool {
        match self.map.lock().expect("not poisoned").get(owner) {
            None => true,
            Some(e) => (e.adds <= 0 && e.dels <= 0) || e.set.elapsed() > EXPECTATIONS_TTL,
        }
    }

    /// Forgets `owner` (it was deleted).
    pub fn remove(&self, owner: &str) {
        self.map.lock().expect("not poisoned").remove(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_go_ahead_of_the_background_backlog_which_still_gets_its_turn() {
        let q = Queue::default();
        background(|| {
            for i in 0..20 {
                q.add(&format!("b{i:02}"));
            }
        });
        // A change to a key waiting in the backlog moves it ahead; the adds of a change
        // made while the backlog waits come first too.
        q.add("b10");
        for i in 0..10 {
            q.add(&format!("c{i}"));
        }
        assert_eq!(q.len(), 30);
        let order: Vec<String> = std::iter::from_fn(|| {
            let k = q.try_next()?;
            q.done(&k);
            Some(k)
        })
        .collect();
        assert_eq!(order.len(), 30, "every key once: {order:?}");
        // Seven changes (b10, c0..c5), then a backlog key (its turn), then the other
        // changes, then the rest of the backlog in order (b10 not twice).
        assert_eq!(
            order[..12],
            ["b10", "c0", "c1", "c2", "c3", "c4", "c5", "b00", "c6", "c7", "c8", "c9"]
        );
        let rest: Vec<&str> = order[12..].iter().map(String::as_str).collect();
        let expected: Vec<String> = (1..20)
            .filter(|&i| i != 10)
            .map(|i| format!("b{i:02}"))
            .collect();
        assert_eq!(rest, expected);
        // Outside `background`, adds are changes again.
        background(|| q.add("x"));
        q.add("y");
        assert_eq!(q.try_next().as_deref(), Some("y"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_queued_once_and_never_processed_twice_at_once() {
        let q = Queue::default();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let k = q.next().await.unwrap();
        assert_eq!(k, "a");
        // Added while being processed: not handed out again until done.
        q.add("a");
        assert_eq!(q.next().await.unwrap(), "b");
        assert!(tokio::time::timeout(Duration::from_millis(10), q.next())
            .await
            .is_err());
        q.done("a");
        assert_eq!(q.next().await.unwrap(), "a");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_and_forget_resets() {
        let q = Queue::default();
        assert_eq!(q.retry("k"), Duration::from_millis(5));
        let t = Instant::now();
        assert_eq!(q.next().await.unwrap(), "k");
        assert!(t.elapsed() >= Duration::from_millis(5));
        q.done("k");
        assert_eq!(q.retry("k"), Duration::from_millis(10));
        assert_eq!(q.retry("k"), Duration::from_millis(20));
        q.forget("k");
        assert_eq!(q.retry("k"), Duration::from_millis(5));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn shutting_down_wakes_waiting_workers() {
        let q = std::sync::Arc::new(Queue::default());
        let w = tokio::spawn({
            let q = q.clone();
            async move { q.next().await }
        });
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(w.await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn expectations_hold_until_seen_or_expired() {
        let e = Expectations::default();
        assert!(e.satisfied("rs"));
        e.expect("rs", 2, 0);
        assert!(!e.satisfied("rs"));
        e.created("rs");
        assert!(!e.satisfied("rs"));
        e.created("rs");
        assert!(e.satisfied("rs"));
        e.expect("rs", 1, 0);
        tokio::time::advance(EXPECTATIONS_TTL + Duration::from_secs(1)).await;
        assert!(e.satisfied("rs"));
    }
}
