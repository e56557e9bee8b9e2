//! The garbage collector: ownerReferences and cascading deletion.
//!
//! Owns the index from an owner's uid to its dependents (from the
//! informers of pods, ReplicaSets, Deployments and Jobs). Rules, as Kubernetes':
//! - a dependent none of whose owners exist any more is deleted (Background cascade);
//!   references to owners that are gone are dropped while another owner remains;
//! - an owner being deleted with the `foregroundDeletion` finalizer has its dependents
//!   deleted (each in the foreground too, so grandchildren go first), and loses the finalizer
//!   once none is left;
//! - an owner being deleted with the `orphan` finalizer has its references removed from its
//!   dependents, then loses the finalizer.
//!
//! "The owner does not exist" is decided on the leader's own store (not a cache that may
//! lag): the owner was written before any dependent naming it, so the leader has applied it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::queue::Queue;
use super::replicaset::ignore_conflict;
use super::{owner, Ctx};
use crate::api::objects::Consistency;
use crate::api::resources::{self, Resource};
use crate::api::status::KubeError;
use crate::api::Call;

/// The field manager the collector writes as.
pub const MANAGER: &str = "generic-garbage-collector";

/// Queue keys for owners (their finalizers) are prefixed so they never clash with
/// dependents' keys.
const OWNER: &str = "owner:";

/// The informers of every kind that can be an owner or a dependent.
fn watched(ctx: &Ctx) -> [&Arc<super::informer::Informer>; 4] {
    [&ctx.pods, &ctx.replicasets, &ctx.deployments, &ctx.jobs]
}

/// The garbage collector of one term.
pub struct Collector {
    pub(crate) queue: Arc<Queue>,
    /// owner uid → dependents' store keys.
    dependents: Arc<Mutex<HashMap<String, HashSet<String>>>>,
}

impl Collector {
    /// Wires the collector to the informers of possible dependents and owners.
    pub fn new(ctx: &Ctx) -> Collector {
        let queue = Arc::new(Queue::default());
        let dependents: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
        for inf in watched(ctx) {
            let (q, deps) = (queue.clone(), dependents.clone());
            inf.subscribe(move |c| {
                let mut d = deps.lock().expect("not poisoned");
                if let Some(old) = c.old {
                    for r in owner::owner_refs(old) {
                        if let Some(u) = r.get("uid").and_then(Value::as_str) {
                            if let Some(set) = d.get_mut(u) {
                                set.remove(c.key);
                                if set.is_empty() {
                                    d.remove(u);
                                }
                            }
                        }
                    }
                }
                if let Some(new) = c.new {
                    let refs = owner::owner_refs(new);
                    for r in refs {
                        if let Some(u) = r.get("uid").and_then(Value::as_str) {
                            d.entry(u.to_string())
                                .or_default()
                                .insert(c.key.to_string());
                        }
                    }
                    if !refs.is_empty() {
                        q.add(c.key);
                    }
                    if owner::is_deleting(new)
                        && owner::finalizers(new)
                            .iter()
                            .any(|f| *f == "foregroundDeletion" || *f == "orphan")
                    {
                        q.add(&format!("{OWNER}{}", c.key));
                    }
                }
                // An owner that went or started going: look at its dependents again.
                let gone = c.new.is_none() || c.new.is_some_and(|n| owner::is_deleting(n));
                if gone {
                    let obj = c.new.or(c.old).expect("a change has an object");
                    if let Some(set) = d.get(owner::uid(obj)) {
                        for k in set {
                            q.add(k);
                        }
                    }
                }
            });
        }
        Collector { queue, dependents }
    }

    fn dependents_of(&self, uid: &str) -> Vec<String> {
        self.dependents
            .lock()
            .expect("not poisoned")
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Handles one queue key: a dependent, or an owner's finalizer.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        match key.strip_prefix(OWNER) {
            Some(owner_key) => self.finalize_owner(ctx, owner_key).await,
            None => self.check_dependent(ctx, key).await,
        }
    }

    /// The resource and informer copy of a cached object by its store key.
    fn cached(ctx: &Ctx, key: &str) -> Option<(&'static Resource, Arc<Value>)> {
        for inf in watched(ctx) {
            if let Some(v) = inf.get(key) {
                return Some((inf.resource(), v));
            }
        }
        None
    }

    async fn check_dependent(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some((r, obj)) = Self::cached(ctx, key) else {
            return Ok(None);
        };
        let refs = owner::owner_refs(&obj).to_vec();
        if refs.is_empty() {
            return Ok(None);
        }
        let ns = owner::namespace(&obj);
        let mut live = Vec::new();
        for rf in &refs {
            if owner_exists(ctx, rf, ns).await? {
                live.push(rf.clone());
            }
        }
        let name = owner::name(&obj).to_string();
        if live.is_empty() {
            // No owner left: delete it (its own dependents follow the same way).
            if owner::is_deleting(&obj) {
                return Ok(None);
            }
            let call = Call::internal(r, ns, Some(&name), None, MANAGER);
            ignore_conflict(ctx.api.delete_value(&call, None).await)?;
            return Ok(None);
        }
        if live.len() < refs.len() {
            // The stored object is edited, at the version judged (a cache may hold a part).
            let call = Call::internal(r, ns, Some(&name), None, MANAGER);
            let seen = owner::seen_version(&obj);
            let pruned = ctx.api.update_with(&call, seen, |cur| {
                let mut next = cur.clone();
                next["metadata"]["ownerReferences"] = json!(live);
                Ok(next)
            });
            ignore_conflict(pruned.await)?;
        }
        Ok(None)
    }

    async fn finalize_owner(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some((r, obj)) = Self::cached(ctx, key) else {
            return Ok(None);
        };
        if !owner::is_deleting(&obj) {
            return Ok(None);
        }
        let fins = owner::finalizers(&obj);
        let uid = owner::uid(&obj).to_string();
        let ns = owner::namespace(&obj);
        let deps: Vec<(&'static Resource, Arc<Value>)> = self
            .dependents_of(&uid)
            .iter()
            .filter_map(|k| Self::cached(ctx, k))
            .collect();
        let mut remove = None;
        if fins.contains(&"orphan") {
            for (dr, d) in &deps {
                let call =
                    Call::internal(dr, owner::namespace(d), Some(owner::name(d)), None, MANAGER);
                let seen = owner::seen_version(d);
                let orphaned = ctx.api.update_with(&call, seen, |cur| {
                    let mut next = cur.clone();
                    next["metadata"]["ownerReferences"] = json!(owner::refs_without(cur, &uid));
                    Ok(next)
                });
                ignore_conflict(orphaned.await)?;
            }
            remove = Some("orphan");
        } else if fins.contains(&"foregroundDeletion") {
            if deps.is_empty() {
                remove = Some("foregroundDeletion");
            } else {
                for (dr, d) in &deps {
                    if owner::is_deleting(d) {
                        continue;
                    }
                    let call = Call::internal(
                        dr,
                        owner::namespace(d),
                        Some(owner::name(d)),
                        None,
                        MANAGER,
                    );
                    let options = json!({"propagationPolicy": "Foreground"});
                    ignore_conflict(ctx.api.delete_value(&call, Some(options)).await)?;
                }
                // Come back when they are gone (their deletions also queue this owner).
                return Ok(Some(Duration::from_secs(1)));
            }
        }
        if let Some(f) = remove {
            let call = Call::internal(r, ns, Some(owner::name(&obj)), None, MANAGER);
            let seen = owner::seen_version(&obj);
            let finalized = ctx.api.update_with(&call, seen, |cur| {
                let mut next = cur.clone();
                let left: Vec<&str> = owner::finalizers(cur)
                    .into_iter()
                    .filter(|x| *x != f)
                    .collect();
                next["metadata"]["finalizers"] = json!(left);
                Ok(next)
            });
            ignore_conflict(finalized.await)?;
        }
        Ok(None)
    }
}

/// Whether the owner a reference names exists (same uid): seen in an informer, or else
/// read from the leader's store (a cache may lag, so only its "yes" is taken as is: an
/// owner deleted since is an event that queues its dependents again; a new leader checks
/// every dependent, and a store read each was most of that work at 20,000 pods).
async fn owner_exists(ctx: &Ctx, rf: &Value, ns: Option<&str>) -> Result<bool, KubeError> {
    let api_version = rf.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = rf.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = rf.get("name").and_then(Value::as_str).unwrap_or("");
    let uid = rf.get("uid").and_then(Value::as_str).unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let Some(r) = resources::RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind)
    else {
        // An owner kind this server does not serve cannot exist here.
        return Ok(false);
    };
    let key = r.key(if r.namespaced { ns } else { None }, name);
    if Collector::cached(ctx, &key).is_some_and(|(_, o)| owner::uid(&o) == uid) {
        return Ok(true);
    }
    Ok(ctx
        .api
        .objects()
        .get(&key, Consistency::Local)
        .await?
        .is_some_and(|s| owner::uid(&s.object) == uid))
}
