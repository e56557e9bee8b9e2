//! Write batching: concurrent writes become few Raft entries and few forwarded RPCs.
//!
//! openraft handles each proposal on its own (one log append, one replication message, one
//! apply call per entry), so under load the per-entry cost dominates. The proposer queues
//! writes and sends whatever has accumulated as one unit, keeping at most
//! [`MAX_IN_FLIGHT`] units outstanding: at low load a write goes out at once (no added
//! latency); under load the queue fills while earlier units are in flight, and the next unit
//! carries all of it. On the leader a unit becomes one log entry ([`crate::Op::Batch`]); on a
//! follower it becomes one forwarded RPC, which the leader's proposer merges with others.
//!
//! Each command keeps its own outcome: one refused command does not fail its neighbours, and
//! every command still gets its own revision.

use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::Error;
use crate::replica::{Inner, Replica};
use crate::types::{Command, CommandResult, Op};

/// The outcome of one command.
pub(crate) type Outcome = Result<CommandResult, Error>;

/// Units proposed but not yet answered.
const MAX_IN_FLIGHT: usize = 4;
/// Most commands in one unit.
const MAX_COMMANDS: usize = 1024;
/// Most key and value bytes in one unit: an entry fits in one append to a follower (see
/// `network::MAX_APPEND_BYTES`), which must arrive within a heartbeat interval.
const MAX_BYTES: usize = 1 << 20;
/// Queue bound; submitters wait when it is full.
const QUEUE: usize = 16 * 1024;

/// Commands submitted together, answered together.
pub(crate) struct Unit {
    pub(crate) cmds: Vec<Command>,
    /// Forwarded from another replica: must be proposed here, never forwarded again (a stale
    /// view of the leader on two replicas must not bounce it between them).
    pub(crate) local_only: bool,
    reply: oneshot::Sender<Result<Vec<Outcome>, Error>>,
}

/// Handle to a replica's proposer task.
pub(crate) struct Proposer {
    tx: mpsc::Sender<Unit>,
    permits: Arc<Semaphore>,
    inner: Weak<Inner>,
}

/// Rough byte size of a command's keys and values.
fn approx_size(cmd: &Command) -> usize {
    match &cmd.op {
        Op::Txn(t) | Op::TracedTxn { txn: t, .. } => {
            use flotilla_store::RequestOp as R;
            let ops: usize = t
                .success
                .iter()
                .chain(&t.failure)
                .map(|op| match op {
                    R::Put(p) => p.key.len() + p.value.len(),
                    R::Range(r) => r.key.len() + r.range_end.len(),
                    R::DeleteRange(d) => d.key.len() + d.range_end.len(),
                })
                .sum();
            ops + t.compare.iter().map(|c| c.key.len() + 16).sum::<usize>() + 32
        }
        Op::Compact { .. } => 16,
        Op::Batch(cmds) => cmds.iter().map(approx_size).sum(),
    }
}

impl Proposer {
    /// Starts the task; it ends when the replica is dropped.
    pub(crate) fn start(inner: Weak<Inner>) -> Proposer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        tokio::spawn(run(inner.clone(), rx, permits.clone()));
        Proposer { tx, permits, inner }
    }

    /// Proposes `cmds` (through the leader) and returns one outcome per command, or an error
    /// that applies to all of them.
    pub(crate) async fn submit(
        &self,
        cmds: Vec<Command>,
        local_only: bool,
    ) -> Result<Vec<Outcome>, Error> {
        let (reply, rx) = oneshot::channel();
        // Idle (nothing queued, a unit slot free): send it from this task at once, saving
        // the hand-offs to the proposer task and back.
        if self.tx.capacity() == self.tx.max_capacity() {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                let Some(inner) = self.inner.upgrade() else {
                    return Err(Error::Stopped("replica stopped".into()));
                };
                let unit = Unit {
                    cmds,
                    local_only,
                    reply,
                };
                dispatch(Replica { inner }, vec![unit]).await;
                drop(permit);
                return rx
                    .await
                    .map_err(|_| Error::Stopped("proposer dropped the request".into()))?;
            }
        }
        self.tx
            .send(Unit {
                cmds,
                local_only,
                reply,
            })
            .await
            .map_err(|_| Error::Stopped("proposer stopped".into()))?;
        rx.await
            .map_err(|_| Error::Stopped("proposer dropped the request".into()))?
    }
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Unit>, permits: Arc<Semaphore>) {
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut bytes: usize = first.cmds.iter().map(approx_size).sum();
        let mut count = first.cmds.len();
        let mut units = vec![first];
        while count < MAX_COMMANDS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(u) => {
                    count += u.cmds.len();
                    bytes += u.cmds.iter().map(approx_size).sum::<usize>();
                    units.push(u);
                }
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            dispatch(Replica { inner }, units).await;
        });
    }
}

/// Sends a group of units on its way and answers each.
async fn dispatch(replica: Replica, mut units: Vec<Unit>) {
    let leader = replica.leadership().borrow().leader;
    let me = replica.id();
    let (mut local, mut forwardable): (Vec<Unit>, Vec<Unit>) = match leader {
        Some(l) if l == me => (std::mem::take(&mut units), Vec::new()),
        _ => units.into_iter().partition(|u| u.local_only),
    };
    // Units that must be proposed here while this replica leads; if it does not, they fail
    // as "not leader" and their submitters retry.
    if !local.is_empty() {
        let (cmds, sizes) = flatten(local.iter_mut());
        let result = if leader == Some(me) {
            replica.propose_local(cmds).await
        } else {
            Err(Error::NotLeader { leader })
        };
        answer(local, sizes, result);
    }
    if !forwardable.is_empty() {
        let (cmds, sizes) = flatten(forwardable.iter_mut());
        trace_ids("forwarding writes to the leader", &cmds);
        let result = match leader {
            Some(l) => replica.forward_writes(l, cmds).await,
            None => Err(Error::NoLeader {
                term: replica.leadership().borrow().term,
            }),
        };
        answer(forwardable, sizes, result);
    }
}

/// Logs (at debug) the request ids among `cmds` with `what` happens to them: a request's
/// writes can be followed across the forward to the leader.
pub(crate) fn trace_ids(what: &str, cmds: &[Command]) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let ids: Vec<&str> = cmds.iter().filter_map(Command::request_id).collect();
        if !ids.is_empty() {
            tracing::debug!(request_ids = ids.join(","), commands = cmds.len(), "{what}");
        }
    }
}

fn flatten<'a>(units: impl Iterator<Item = &'a mut Unit>) -> (Vec<Command>, Vec<usize>) {
    let mut cmds = Vec::new();
    let mut sizes = Vec::new();
    for u in units {
        sizes.push(u.cmds.len());
        cmds.append(&mut u.cmds);
    }
    (cmds, sizes)
}

fn answer(units: Vec<Unit>, sizes: Vec<usize>, result: Result<Vec<Outcome>, Error>) {
    match result {
        Ok(mut outcomes) => {
            for (u, n) in units.into_iter().zip(sizes) {
                let rest = outcomes.split_off(n.min(outcomes.len()));
                let mine = std::mem::replace(&mut outcomes, rest);
                let _ = u.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            for u in units {
                let _ = u.reply.send(Err(e.clone()));
            }
        }
    }
}

impl Replica {
    /// Proposes `cmds` as one entry on this replica, which must lead. Commands that fail
    /// validation or the quota are answered without being proposed.
    pub(crate) async fn propose_local(&self, cmds: Vec<Command>) -> Result<Vec<Outcome>, Error> {
        self.check_leading()?;
        let n = cmds.len();
        let over_quota = if cmds
            .iter()
            .any(|c| c.op.as_txn().is_some_and(|t| t.has_puts()))
        {
            self.over_quota()
        } else {
            None
        };
        let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
        let mut proposed = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        for (i, cmd) in cmds.into_iter().enumerate() {
            let refusal = match &cmd.op {
                Op::Txn(t) | Op::TracedTxn { txn: t, .. } => {
                    match t.validate(&flotilla_store::Limits::default()) {
                        Err(e) => Some(Error::Invalid(e.to_string())),
                        Ok(()) if t.has_puts() => over_quota.clone().map(Error::NoSpace),
                        Ok(()) => None,
                    }
                }
                Op::Batch(_) => Some(Error::Invalid(
                    "batches cannot be submitted directly".into(),
                )),
                Op::Compact { .. } => None,
            };
            match refusal {
                Some(e) => outcomes[i] = Some(Err(e)),
                None => {
                    positions.push(i);
                    proposed.push(cmd);
                }
            }
        }
        if !proposed.is_empty() {
            let entry = if proposed.len() == 1 {
                proposed.pop().expect("one command")
            } else {
                Command {
                    fence_term: None,
                    op: Op::Batch(proposed),
                }
            };
            let single = positions.len() == 1;
            let written = self.client_write(entry).await;
            self.inner
                .observer
                .proposed(positions.len(), written.is_ok());
            let results = match written? {
                CommandResult::Batch(rs) if !single => rs,
                other => vec![other],
            };
            if results.len() != positions.len() {
                return Err(Error::Internal(format!(
                    "{} results for {} proposed commands",
                    results.len(),
                    positions.len()
                )));
            }
            for (pos, r) in positions.into_iter().zip(results) {
                outcomes[pos] = Some(match r {
                    CommandResult::Rejected(e) => Err(Error::Apply(e)),
                    other => Ok(other),
                });
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every command answered"))
            .collect())
    }
}
