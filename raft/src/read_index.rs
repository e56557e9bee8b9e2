//! Linearizable-read coalescing: one ReadIndex round answers every read that was waiting
//! when the round began (etcd's linearizable read loop). Without it each read costs the
//! leader a heartbeat round to every voter, and under load those rounds time out.
//!
//! Owns the queue of waiting reads. Invariants:
//! - a read is answered only with the result of a round that started after it arrived (so
//!   the index covers every write acknowledged before the read);
//! - at most one round runs at a time, in a task of its own (a caller that goes away never
//!   strands the others);
//! - the queue is bounded: a read beyond the bound is refused at once with [`Error::Busy`].

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::error::Error;

/// Most reads waiting for one round.
pub(crate) const MAX_WAITING: usize = 65_536;

type Waiter = oneshot::Sender<Result<u64, Error>>;

#[derive(Default)]
pub(crate) struct ReadQueue {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: Vec<Waiter>,
    running: bool,
}

impl ReadQueue {
    /// The read index from a round that starts after this call; `round` runs one round.
    pub(crate) async fn read_index<F, Fut>(self: &Arc<Self>, round: F) -> Result<u64, Error>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, Error>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().expect("not poisoned");
            if s.waiting.len() >= MAX_WAITING {
                return Err(Error::Busy(format!(
                    "{MAX_WAITING} linearizable reads are already waiting"
                )));
            }
            s.waiting.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let queue = self.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut s = queue.state.lock().expect("not poisoned");
                        if s.waiting.is_empty() {
                            s.running = false;
                            return;
                        }
                        std::mem::take(&mut s.waiting)
                    };
                    let result = round().await;
                    for w in batch {
                        let _ = w.send(result.clone());
                    }
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::Stopped("the read loop ended".into())))
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.state.lock().expect("not poisoned").waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn reads_share_rounds_that_start_after_they_arrive() {
        let q = Arc::new(ReadQueue::default());
        let rounds = Arc::new(AtomicU64::new(0));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(0u64);
        let round = {
            let rounds = rounds.clone();
            move || {
                let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                let mut gate = gate_rx.clone();
                async move {
                    // Each round waits until the test lets it finish.
                    gate.wait_for(|g| *g >= n).await.unwrap();
                    Ok(n * 100)
                }
            }
        };
        // The first read starts round 1.
        let first = tokio::spawn({
            let (q, round) = (q.clone(), round.clone());
            async move { q.read_index(round).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 1);
        // Reads arriving during round 1 must not get its answer: they wait for round 2.
        let later: Vec<_> = (0..10)
            .map(|_| {
                let (q, round) = (q.clone(), round.clone());
                tokio::spawn(async move { q.read_index(round).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(q.waiting(), 10);
        gate_tx.send(1).unwrap();
        assert_eq!(first.await.unwrap(), Ok(100));
        gate_tx.send(2).unwrap();
        for r in later {
            assert_eq!(r.await.unwrap(), Ok(200), "ten reads shared round 2");
        }
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_round_fails_its_reads_and_the_next_round_starts_fresh() {
        let q = Arc::new(ReadQueue::default());
        let calls = Arc::new(AtomicU64::new(0));
        let round = {
            let calls = calls.clone();
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(Error::NoQuorum { millis: 5 })
                    } else {
                        Ok(7)
                    }
                }
            }
        };
        assert_eq!(
            q.read_index(round.clone()).await,
            Err(Error::NoQuorum { millis: 5 })
        );
        assert_eq!(q.read_index(round).await, Ok(7));
    }
}
