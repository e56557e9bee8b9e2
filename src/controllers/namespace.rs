//! The namespace controller and the service-account controller.
//!
//! Namespace deletion, as Kubernetes does it: the API marks a namespace `Terminating`
//! (`deletionTimestamp`, `status.phase`) and refuses new content in it; this controller
//! deletes everything the namespace holds through the API (so pods terminate gracefully,
//! finalizers and cascades are honoured and Service addresses are released), looks again
//! while anything remains, and then removes its `kubernetes` entry from `spec.finalizers`,
//! at which point the API deletes the namespace. Content is read from the leader's own
//! store, not an informer, so nothing created just before the mark is missed.
//!
//! The service-account controller gives every namespace that is not terminating a
//! `default` ServiceAccount, and recreates it if it is deleted.

use crate::api::meta::Ptr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use super::queue::Queue;
use super::replicaset::ignore_conflict;
use super::{owner, Ctx};
use crate::api::objects::{prefix_end, Consistency};
use crate::api::resources;
use crate::api::status::KubeError;
use crate::api::Call;

/// The field manager the namespace controller writes as.
pub const MANAGER: &str = "namespace-controller";
/// The field manager the service-account controller writes as.
pub const SA_MANAGER: &str = "service-account-controller";
/// The finalizer this controller owns in `spec.finalizers`.
pub const FINALIZER: &str = "kubernetes";
/// Objects read per store range while emptying a namespace.
const PAGE: i64 = 500;
/// Deletes of a terminating namespace's objects in flight at once.
const DELETES_AT_ONCE: usize = 64;
/// How soon to look again at a namespace whose content is still going.
const RECHECK: Duration = Duration::from_secs(1);

/// Kinds emptied before the rest: what makes and tracks pods (their controllers would
/// otherwise try to replace each pod deleted, refused in a terminating namespace, and
/// retry), and Services (whose Endpoints would otherwise be rewritten for every pod that
/// goes: at 3,000 pods per namespace, most of a teardown's writes).
const FIRST: [&str; 5] = ["Deployment", "ReplicaSet", "DaemonSet", "Job", "Service"];

/// The namespaced resources in the order a terminating namespace is emptied: [`FIRST`],
/// then the others as served.
fn deletion_order() -> Vec<&'static resources::Resource> {
    let namespaced = || resources::RESOURCES.iter().filter(|r| r.namespaced);
    let first = FIRST
        .iter()
        .flat_map(|k| namespaced().filter(move |r| r.kind == *k));
    first
        .chain(namespaced().filter(|r| !FIRST.contains(&r.kind)))
        .collect()
}

/// The namespace controller's state.
pub struct Controller {
    pub(crate) queue: Arc<Queue>,
}

impl Controller {
    /// Wires the controller: a namespace change queues it.
    pub fn new(ctx: &Ctx) -> Controller {
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        ctx.namespaces.subscribe(move |c| {
            if c.new.is_some_and(|n| owner::is_deleting(n)) {
                q.add(c.key);
            }
        });
        Controller { queue }
    }

    /// Empties one terminating namespace, then releases it.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(ns) = ctx.namespaces.get(key) else {
            return Ok(None);
        };
        let has_finalizer = ns
            .ptr("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x == FINALIZER));
        if !owner::is_deleting(&ns) || !has_finalizer {
            return Ok(None);
        }
        let name = owner::name(&ns).to_string();
        let mut remaining = 0usize;
        for r in deletion_order() {
            let prefix = format!("{}{name}/", r.prefix());
            let end = prefix_end(prefix.as_bytes());
            let mut start = prefix.clone().into_bytes();
            loop {
                let (items, _, _) = ctx
                    .api
                    .objects()
                    .range(&start, &end, 0, PAGE, Consistency::Local)
                    .await?;
                let Some(last) = items.last() else { break };
                let last_name = owner::name(&last.object).to_string();
                remaining += items.len();
                // Deleted DELETES_AT_ONCE at a time (as DeleteCollection does server-side):
                // one at a time, a namespace of thousands of pods took minutes.
                let calls: Vec<Call> = items
                    .iter()
                    .filter(|item| !owner::is_deleting(&item.object))
                    .map(|item| {
                        Call::internal(
                            r,
                            Some(&name),
                            Some(owner::name(&item.object)),
                            None,
                            MANAGER,
                        )
                    })
                    .collect();
                let api = &ctx.api;
                let results: Vec<_> = futures::stream::iter(
                    calls
                        .into_iter()
                        .map(|call| async move { api.delete_value(&call, None).await }),
                )
                .buffer_unordered(DELETES_AT_ONCE)
                .collect()
                .await;
                for r in results {
                    ignore_conflict(r)?;
                }
                if (items.len() as i64) < PAGE {
                    break;
                }
                start = format!("{prefix}{last_name}\0").into_bytes();
            }
        }
        if remaining > 0 {
            return Ok(Some(RECHECK));
        }
        let mut next = (*ns).clone();
        let left: Vec<Value> = ns
            .ptr("/spec/finalizers")
            .and_then(Value::as_array)
            .map(|f| f.iter().filter(|x| *x != FINALIZER).cloned().collect())
            .unwrap_or_default();
        next["spec"]["finalizers"] = json!(left);
        let r = ctx.namespaces.resource();
        let call = Call::internal(r, None, Some(&name), None, MANAGER);
        ignore_conflict(ctx.api.update_value(&call, next).await)?;
        Ok(None)
    }
}

/// The service-account controller's state.
pub struct ServiceAccounts {
    pub(crate) queue: Arc<Queue>,
}

impl ServiceAccounts {
    /// Wires the controller: a namespace that appears, or a `default` ServiceAccount that
    /// goes, queues the namespace.
    pub fn new(ctx: &Ctx) -> ServiceAccounts {
        let queue = Arc::new(Queue::default());
        {
            let q = queue.clone();
            ctx.namespaces.subscribe(move |c| {
                if c.old.is_none() {
                    q.add(c.key);
                }
            });
        }
        {
            let q = queue.clone();
            let ns_res = ctx.namespaces.resource();
            ctx.serviceaccounts.subscribe(move |c| {
                if let (Some(old), None) = (c.old, c.new) {
                    if owner::name(old) == "default" {
                        if let Some(ns) = owner::namespace(old) {
                            q.add(&ns_res.key(None, ns));
                        }
                    }
                }
            });
        }
        ServiceAccounts { queue }
    }

    /// Creates the namespace's `default` ServiceAccount if it is missing.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(ns) = ctx.namespaces.get(key) else {
            return Ok(None);
        };
        if owner::is_deleting(&ns) {
            return Ok(None);
        }
        let name = owner::name(&ns);
        let r = ctx.serviceaccounts.resource();
        if ctx
            .serviceaccounts
            .get(&r.key(Some(name), "default"))
            .is_some()
        {
            return Ok(None);
        }
        let call = Call::internal(r, Some(name), None, None, SA_MANAGER);
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": "default", "namespace": name}});
        match ctx.api.create_value(&call, sa, false).await {
            Ok(_) => Ok(None),
            Err(e) if e.code == 409 && e.reason == "AlreadyExists" => Ok(None),
            // The namespace began terminating meanwhile.
            Err(e) if e.code == 403 => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_emptied_of_its_workloads_and_services_before_its_pods() {
        let order: Vec<&str> = deletion_order().iter().map(|r| r.kind).collect();
        let at = |k: &str| order.iter().position(|x| *x == k).expect(k);
        for k in FIRST {
            assert!(at(k) < at("Pod"), "{k} before pods: {order:?}");
        }
        // Every namespaced resource once, and nothing cluster-scoped.
        let mut want: Vec<&str> = resources::RESOURCES
            .iter()
            .filter(|r| r.namespaced)
            .map(|r| r.kind)
            .collect();
        let mut got = order.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(!order.contains(&"Node"));
    }
}
