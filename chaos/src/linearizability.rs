//! A linearizability checker for key-value register histories (Wing & Gong's search with
//! Lowe's memoization, as Porcupine and Knossos implement it).
//!
//! A history is a set of operations, each with the time it was invoked and, if the client
//! heard back, the time it returned and what it returned. The history is linearizable if
//! every operation can be given a single instant between its call and its return such that
//! replaying them in that order on one register reproduces every returned output.
//!
//! Operations whose outcome the client does not know (it timed out, or the connection broke
//! after the request was sent) are *indeterminate*: they get a return time of +∞ and any
//! output is accepted. So each may take effect at any instant after its call, or, placed
//! after everything else, never be observed at all, which is exactly what a lost request
//! may do. Operations that certainly did not happen (refused before being proposed) are not
//! in the history at all.
//!
//! Keys are independent registers, so each key's history is checked on its own (Herlihy &
//! Wing's locality: the whole is linearizable iff each key is).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// What a client asked of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Input {
    /// Read the value (`None`: the key is absent).
    Read,
    /// Set the value.
    Write(String),
    /// Set the value to `to` if it is `from` (an etcd transaction comparing the value).
    Cas {
        /// The value the key must hold.
        from: String,
        /// The value it gets.
        to: String,
    },
}

/// What the client heard back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Output {
    /// A read's result.
    Read(Option<String>),
    /// A write took effect.
    Written,
    /// Whether a compare-and-swap's comparison held (and so whether it wrote).
    Cas(bool),
    /// Unknown: the operation may or may not have taken effect.
    Unknown,
}

/// One operation of one client on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// The client that made it (a client has one operation outstanding at a time).
    pub client: u32,
    /// The replica it was sent to (for the report; the checker ignores it).
    #[serde(default)]
    pub server: String,
    /// The key.
    pub key: String,
    /// What was asked.
    pub input: Input,
    /// When it was sent (microseconds since the run started).
    pub call_us: u64,
    /// When the answer arrived; `None` for an indeterminate operation.
    pub return_us: Option<u64>,
    /// What was answered ([`Output::Unknown`] when indeterminate).
    pub output: Output,
}

/// The register's state: the value, or `None` while the key is absent.
type State = Option<String>;

/// Applies `input` to `state`; `None` if `output` could not have been returned from it.
fn step(state: &State, input: &Input, output: &Output) -> Option<State> {
    match (input, output) {
        (Input::Read, Output::Read(v)) => (v == state).then(|| state.clone()),
        (Input::Read, Output::Unknown) => Some(state.clone()),
        (Input::Write(v), Output::Written | Output::Unknown) => Some(Some(v.clone())),
        (Input::Cas { from, to }, out) => {
            let holds = state.as_deref() == Some(from.as_str());
            match out {
                Output::Cas(said) if *said != holds => None,
                Output::Cas(_) | Output::Unknown => Some(if holds {
                    Some(to.clone())
                } else {
                    state.clone()
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// None exists. `stuck_at` lists the operations (indices into the key's history)
    /// that the longest partial linearization could not place next.
    NotLinearizable {
        /// The most operations any partial linearization placed.
        longest_prefix: usize,
        /// Indices of operations that were pending when the search got stuck there.
        stuck_at: Vec<usize>,
    },
    /// The search gave up after too many steps (the history is too concurrent to decide).
    Unknown,
}

/// Most search steps per key before giving up with [`Verdict::Unknown`].
pub const MAX_STEPS: u64 = 20_000_000;

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// Index of the matching event (call ↔ return).
    mate: usize,
    prev: usize,
    next: usize,
}

/// Checks one key's operations, all on the same register starting absent.
pub fn check_key(ops: &[Operation]) -> Verdict {
    check_key_from(ops, None)
}

/// Checks one key's operations on a register that starts with `initial`.
pub fn check_key_from(ops: &[Operation], initial: State) -> Verdict {
    if ops.is_empty() {
        return Verdict::Linearizable;
    }
    // Events sorted by time; at equal times calls come first (an operation returning at t
    // and another called at t may be concurrent: being permissive here never hides a
    // violation the clock could prove).
    let mut times: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        times.push((op.call_us, true, i));
        times.push((op.return_us.unwrap_or(u64::MAX), false, i));
    }
    times.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // A doubly linked list over the events with a head sentinel at index `n`.
    let n = times.len();
    let head = n;
    let mut ev: Vec<Event> = Vec::with_capacity(n + 1);
    let mut call_of = vec![0usize; ops.len()];
    let mut ret_of = vec![0usize; ops.len()];
    for (pos, &(_, is_call, op)) in times.iter().enumerate() {
        if is_call {
            call_of[op] = pos;
        } else {
            ret_of[op] = pos;
        }
        ev.push(Event {
            op,
            is_call,
            mate: 0,
            prev: if pos == 0 { head } else { pos - 1 },
            next: if pos + 1 == n { usize::MAX } else { pos + 1 },
        });
    }
    for e in ev.iter_mut() {
        e.mate = if e.is_call {
            ret_of[e.op]
        } else {
            call_of[e.op]
        };
    }
    ev.push(Event {
        op: usize::MAX,
        is_call: false,
        mate: usize::MAX,
        prev: usize::MAX,
        next: 0,
    });

    fn unlink(ev: &mut [Event], i: usize) {
        let (p, nx) = (ev[i].prev, ev[i].next);
        ev[p].next = nx;
        if nx != usize::MAX {
            ev[nx].prev = p;
        }
    }
    fn relink(ev: &mut [Event], i: usize) {
        let (p, nx) = (ev[i].prev, ev[i].next);
        ev[p].next = i;
        if nx != usize::MAX {
            ev[nx].prev = i;
        }
    }

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = initial;
    let mut entry = ev[head].next;
    let mut steps: u64 = 0;
    let mut longest = 0usize;
    let mut stuck_at = Vec::new();
    while ev[head].next != usize::MAX {
        steps += 1;
        if steps > MAX_STEPS {
            return Verdict::Unknown;
        }
        let e = ev[entry];
        if e.is_call {
            let op = &ops[e.op];
            if let Some(next_state) = step(&state, &op.input, &op.output) {
                let mut with = linearized.clone();
                with[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((with.clone(), next_state.clone())) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = with;
                    unlink(&mut ev, entry);
                    unlink(&mut ev, e.mate);
                    entry = ev[head].next;
                    continue;
                }
            }
            entry = e.next;
        } else {
            // A return reached with its call not yet placed: this prefix cannot be extended.
            if stack.len() >= longest {
                longest = stack.len();
                stuck_at = pending(&ev, head);
            }
            let Some((call, prev_state)) = stack.pop() else {
                return Verdict::NotLinearizable {
                    longest_prefix: longest,
                    stuck_at,
                };
            };
            let op = ev[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = prev_state;
            // Relink in reverse order of unlinking.
            let mate = ev[call].mate;
            relink(&mut ev, mate);
            relink(&mut ev, call);
            entry = ev[call].next;
        }
    }
    Verdict::Linearizable
}

/// The operations whose calls are still in the list up to the first return.
fn pending(ev: &[Event], head: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = ev[head].next;
    while i != usize::MAX {
        if !ev[i].is_call {
            break;
        }
        out.push(ev[i].op);
        i = ev[i].next;
    }
    out
}

/// Checks a whole history key by key. Returns the verdict for each key.
pub fn check(history: &[Operation]) -> BTreeMap<String, Verdict> {
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    by_key
        .into_iter()
        .map(|(k, ops)| (k.to_string(), check_key(&ops)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, input: Input, call: u64, ret: Option<u64>, output: Output) -> Operation {
        Operation {
            client,
            server: String::new(),
            key: "k".into(),
            input,
            call_us: call,
            return_us: ret,
            output,
        }
    }
    fn w(c: u32, v: &str, call: u64, ret: u64) -> Operation {
        op(c, Input::Write(v.into()), call, Some(ret), Output::Written)
    }
    fn r(c: u32, v: Option<&str>, call: u64, ret: u64) -> Operation {
        op(
            c,
            Input::Read,
            call,
            Some(ret),
            Output::Read(v.map(str::to_string)),
        )
    }
    fn cas(c: u32, from: &str, to: &str, ok: bool, call: u64, ret: u64) -> Operation {
        op(
            c,
            Input::Cas {
                from: from.into(),
                to: to.into(),
            },
            call,
            Some(ret),
            Output::Cas(ok),
        )
    }
    fn lin(ops: &[Operation]) -> bool {
        matches!(check_key(ops), Verdict::Linearizable)
    }

    #[test]
    fn sequential_histories_are_checked_against_the_register() {
        assert!(lin(&[w(1, "a", 0, 1), r(2, Some("a"), 2, 3)]));
        assert!(lin(&[
            r(1, None, 0, 1),
            w(1, "a", 2, 3),
            r(1, Some("a"), 4, 5)
        ]));
        // A read that sees a value nobody wrote.
        assert!(!lin(&[w(1, "a", 0, 1), r(2, Some("b"), 2, 3)]));
    }

    #[test]
    fn a_stale_read_is_rejected() {
        // b is acknowledged before the read starts, yet the read returns a.
        assert!(!lin(&[
            w(1, "a", 0, 1),
            w(1, "b", 2, 3),
            r(2, Some("a"), 4, 5),
        ]));
        // Overlapping the write of b, reading a is fine.
        assert!(lin(&[
            w(1, "a", 0, 1),
            w(1, "b", 2, 6),
            r(2, Some("a"), 4, 5),
        ]));
    }

    #[test]
    fn a_lost_write_is_rejected() {
        // b was acknowledged, and later reads never see it, though nothing overwrote it.
        assert!(!lin(&[
            w(1, "a", 0, 1),
            w(2, "b", 2, 3),
            r(3, Some("a"), 4, 5),
        ]));
        // An acknowledged CAS that the final state does not reflect.
        assert!(!lin(&[
            w(1, "a", 0, 1),
            cas(2, "a", "b", true, 2, 3),
            r(3, Some("a"), 4, 5),
        ]));
    }

    #[test]
    fn a_duplicated_write_is_rejected() {
        // a is written once, then overwritten by b; a read then sees a again: the write
        // of a was applied twice (a retried request executed a second time).
        assert!(!lin(&[
            w(1, "a", 0, 1),
            w(2, "b", 2, 3),
            r(3, Some("b"), 4, 5),
            r(3, Some("a"), 6, 7),
        ]));
        // Two compare-and-swaps from the same value cannot both succeed.
        assert!(!lin(&[
            w(1, "a", 0, 1),
            cas(2, "a", "b", true, 2, 5),
            cas(3, "a", "c", true, 2, 5),
        ]));
        assert!(lin(&[
            w(1, "a", 0, 1),
            cas(2, "a", "b", true, 2, 5),
            cas(3, "a", "c", false, 2, 5),
        ]));
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_any_order() {
        // Two overlapping writes; reads after both agree on the last one.
        let h = [
            w(1, "a", 0, 10),
            w(2, "b", 1, 9),
            r(3, Some("a"), 11, 12),
            r(3, Some("a"), 13, 14),
        ];
        assert!(lin(&h));
        // ... but they cannot flip-flop.
        let h = [
            w(1, "a", 0, 10),
            w(2, "b", 1, 9),
            r(3, Some("a"), 11, 12),
            r(3, Some("b"), 13, 14),
        ];
        assert!(!lin(&h));
    }

    #[test]
    fn indeterminate_operations_may_or_may_not_take_effect() {
        let timed_out =
            |c, v: &str, call| op(c, Input::Write(v.into()), call, None, Output::Unknown);
        // It never showed up: fine.
        assert!(lin(&[
            w(1, "a", 0, 1),
            timed_out(2, "b", 2),
            r(3, Some("a"), 10, 11),
        ]));
        // It showed up much later than its call: fine too.
        assert!(lin(&[
            w(1, "a", 0, 1),
            timed_out(2, "b", 2),
            r(3, Some("a"), 10, 11),
            r(3, Some("b"), 20, 21),
        ]));
        // But once seen, it cannot disappear again.
        assert!(!lin(&[
            w(1, "a", 0, 1),
            timed_out(2, "b", 2),
            r(3, Some("b"), 10, 11),
            r(3, Some("a"), 20, 21),
        ]));
        // Nor take effect before it was sent.
        assert!(!lin(&[
            w(1, "a", 0, 1),
            r(3, Some("b"), 2, 3),
            timed_out(2, "b", 4),
        ]));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut a = w(1, "x", 0, 1);
        a.key = "a".into();
        let mut b = r(2, Some("x"), 2, 3);
        b.key = "b".into();
        let verdicts = check(&[a, b]);
        assert_eq!(verdicts["a"], Verdict::Linearizable);
        assert!(matches!(verdicts["b"], Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_long_concurrent_history_is_decided() {
        // 8 clients, 400 operations, each client writing its own values and reading, all
        // overlapping their neighbours: linearizable by construction (each op's effect is
        // placed at its midpoint on one register).
        let mut ops = Vec::new();
        let mut reg: Option<String> = None;
        let mut t = 0u64;
        let mut events: Vec<(u64, Operation)> = Vec::new();
        for i in 0..400u64 {
            let c = (i % 8) as u32;
            let call = t;
            let mid = t + 5;
            let ret = t + 10 + (i % 7) * 3;
            t += 2;
            let o = if i % 3 == 0 {
                let v = format!("v{i}");
                events.push((mid, w(c, &v, call, ret)));
                continue;
            } else {
                r(c, None, call, ret)
            };
            events.push((mid, o));
        }
        events.sort_by_key(|(m, _)| *m);
        for (_, mut o) in events {
            match &o.input {
                Input::Write(v) => reg = Some(v.clone()),
                Input::Read => o.output = Output::Read(reg.clone()),
                Input::Cas { .. } => unreachable!(),
            }
            ops.push(o);
        }
        assert_eq!(check_key(&ops), Verdict::Linearizable);
    }
}
