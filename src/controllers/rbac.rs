//! The ClusterRole aggregation controller: a ClusterRole with an `aggregationRule` gets, as
//! its `rules`, the rules of every other ClusterRole its selectors match (how `admin`,
//! `edit` and `view` grow when a ClusterRole labelled
//! `rbac.authorization.k8s.io/aggregate-to-view: "true"` is added), kept current as roles
//! come, change and go.
//!
//! Owns the `rules` of aggregated ClusterRoles. Invariants: the rules are a function of the
//! ClusterRoles in the informer ([`crate::api::rbac::aggregate`]); a role whose rules are
//! already that is not written; chains (an aggregated role feeding another) settle because
//! every ClusterRole change queues every aggregated role again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::queue::Queue;
use super::replicaset::ignore_conflict;
use super::{owner, Ctx};
use crate::api::rbac;
use crate::api::status::KubeError;
use crate::api::Call;

/// The field manager the controller writes as.
pub const MANAGER: &str = "clusterrole-aggregation-controller";

/// The controller's state.
pub struct Aggregation {
    pub(crate) queue: Arc<Queue>,
}

fn aggregated(v: &Value) -> bool {
    v.get("aggregationRule").is_some()
}

impl Aggregation {
    /// Wires the controller: any ClusterRole change queues every aggregated ClusterRole.
    pub fn new(ctx: &Ctx) -> Aggregation {
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        let roles = Arc::downgrade(&ctx.clusterroles);
        ctx.clusterroles.subscribe(move |c| {
            if c.new.is_some_and(|n| aggregated(n)) {
                q.add(c.key);
            }
            if let Some(roles) = roles.upgrade() {
                for k in roles.keys() {
                    if roles.get(&k).is_some_and(|r| aggregated(&r)) {
                        q.add(&k);
                    }
                }
            }
        });
        Aggregation { queue }
    }

    /// Writes one aggregated ClusterRole's rules if they are not what its selectors give.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some(role) = ctx.clusterroles.get(key) else {
            return Ok(None);
        };
        let Some(rules) = rbac::aggregate(&role, &ctx.clusterroles.list()) else {
            return Ok(None);
        };
        let current = role.get("rules").cloned().unwrap_or_else(|| json!([]));
        if current == json!(rules) {
            return Ok(None);
        }
        let mut next = (*role).clone();
        next["rules"] = json!(rules);
        let call = Call::internal(
            ctx.clusterroles.resource(),
            None,
            Some(owner::name(&role)),
            None,
            MANAGER,
        );
        ignore_conflict(ctx.api.update_value(&call, next).await)?;
        Ok(None)
    }
}
