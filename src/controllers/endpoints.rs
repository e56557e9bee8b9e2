//! The Endpoints and EndpointSlice controllers: which pods back each Service.
//!
//! Owns its work queue and the versions of its own last writes (see [`Echoes`]). For every Service with a selector, [`desired`] (pure)
//! computes, from the pods of its namespace that match the selector and have an IP:
//! - the `Endpoints` object of the same name: ready pods under `addresses`, others under
//!   `notReadyAddresses` (all ready with `publishNotReadyAddresses`), terminating and
//!   finished pods left out; pods grouped into subsets by their resolved ports;
//! - its EndpointSlices (label `kubernetes.io/service-name`, managed by
//!   `endpointslice-controller.k8s.io`, owned by the Service): one per distinct port set,
//!   at most [`MAX_PER_SLICE`] endpoints each, terminating pods included with
//!   `terminating: true`; an empty placeholder slice when nothing backs the Service.
//!
//! A `targetPort` given by name is resolved in each pod's container ports (a pod that does
//! not name it gets no endpoint for that port). A Service without a selector is left to
//! whoever writes its Endpoints. When a Service goes, the Endpoints this controller wrote
//! (its manager in `managedFields`) and its slices go too; hand-made ones stay.

use crate::api::meta::Ptr;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::queue::Queue;
use super::replicaset::ignore_conflict;
use super::{owner, pod, Ctx};
use crate::api::status::KubeError;
use crate::api::Call;

/// The field manager of Endpoints.
pub const MANAGER: &str = "endpoint-controller";
/// The `managed-by` label value of slices this controller owns.
pub const SLICE_MANAGER: &str = "endpointslice-controller.k8s.io";
/// Endpoints per EndpointSlice (Kubernetes' default `--max-endpoints-per-slice`).
pub const MAX_PER_SLICE: usize = 100;
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// The selector of a Service (`None` without one: its endpoints are not ours).
fn selector(svc: &Value) -> Option<&serde_json::Map<String, Value>> {
    svc.ptr("/spec/selector")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
}

fn selects(svc: &Value, p: &Value) -> bool {
    selector(svc).is_some_and(|sel| {
        let labels = p.ptr("/metadata/labels");
        sel.iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    })
}

/// A pod's ports for the Service: (name, port, protocol) per Service port it resolves.
fn resolve_ports(svc: &Value, p: &Value) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for sp in svc
        .ptr("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let protocol = sp
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_string();
        let name = sp
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let port = match sp.get("targetPort") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => match s.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => p
                    .ptr("/spec/containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .flat_map(|c| {
                        c.get("ports")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                    })
                    .find(|cp| {
                        cp.get("name").and_then(Value::as_str) == Some(s.as_str())
                            && cp.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                                == protocol
                    })
                    .and_then(|cp| cp.get("containerPort").and_then(Value::as_i64)),
            },
            _ => sp.get("port").and_then(Value::as_i64),
        };
        if let Some(port) = port {
            out.push((name, port, protocol));
        }
    }
    out
}

fn ports_json(ports: &[(String, i64, String)]) -> Value {
    json!(ports
        .iter()
        .map(|(n, p, proto)| {
            let mut v = json!({"port": p, "protocol": proto});
            if !n.is_empty() {
                v["name"] = json!(n);
            }
            v
        })
        .collect::<Vec<_>>())
}

fn target_ref(p: &Value) -> Value {
    json!({"kind": "Pod", "namespace": owner::namespace(p), "name": owner::name(p), "uid": owner::uid(p)})
}

/// FNV-1a of `text`, as 8 hex digits (stable slice names).
fn short_hash(text: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// What a Service's Endpoints `subsets` and EndpointSlices should be.
pub fn desired(svc: &Value, pods: &[Arc<Value>]) -> (Value, Vec<Value>) {
    let publish_not_ready = svc
        .ptr("/spec/publishNotReadyAddresses")
        .and_then(Value::as_bool)
        == Some(true);
    let svc_name = owner::name(svc);
    let ns = owner::namespace(svc);
    // Port set → (ready addresses, not-ready addresses, slice endpoints).
    type Group = (Vec<Value>, Vec<Value>, Vec<Value>);
    let mut groups: BTreeMap<Vec<(String, i64, String)>, Group> = BTreeMap::new();
    let mut matched: Vec<&Arc<Value>> = pods.iter().filter(|p| selects(svc, p)).collect();
    // By address, then name (borrowed: a comparison allocated two strings before).
    fn ip(p: &Value) -> Option<&str> {
        p.ptr("/status/podIP").and_then(Value::as_str)
    }
    matched.sort_by(|a, b| {
        ip(a)
            .cmp(&ip(b))
            .then_with(|| owner::name(a).cmp(owner::name(b)))
    });
    for p in matched {
        let Some(ip) = p
            .ptr("/status/podIP")
            .and_then(Value::as_str)
            .filter(|ip| !ip.is_empty())
        else {
            continue;
        };
        if matches!(pod::phase(p), "Succeeded" | "Failed") {
            continue;
        }
        let ports = resolve_ports(svc, p);
        if ports.is_empty() && svc.ptr("/spec/ports").is_some() {
            continue;
        }
        let terminating = owner::is_deleting(p);
        let ready = pod::is_ready(p) || publish_not_ready;
        let mut address = json!({"ip": ip, "targetRef": target_ref(p)});
        if let Some(n) = pod::node(p) {
            address["nodeName"] = json!(n);
        }
        let g = groups.entry(ports).or_default();
        if !terminating {
            if ready {
                g.0.push(address.clone());
            } else {
                g.1.push(address.clone());
            }
        }
        let mut ep = json!({
            "addresses": [ip],
            "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
            "targetRef": target_ref(p),
        });
        if let Some(n) = pod::node(p) {
            ep["nodeName"] = json!(n);
        }
        g.2.push(ep);
    }
    let mut subsets = Vec::new();
    let mut slices = Vec::new();
    let slice = |name: String, ports: Option<Value>, endpoints: Vec<Value>| {
        let mut s = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {SERVICE_NAME: svc_name, MANAGED_BY: SLICE_MANAGER},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc_name,
                                     "uid": owner::uid(svc), "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
        });
        if let Some(p) = ports {
            s["ports"] = p;
        }
        s
    };
    for (ports, (ready, not_ready, endpoints)) in groups {
        if !ready.is_empty() || !not_ready.is_empty() {
            let mut subset = json!({"ports": ports_json(&ports)});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready);
            }
            subsets.push(subset);
        }
        let base = format!(
            "{}-{}",
            &svc_name[..svc_name.len().min(50)],
            short_hash(&format!("{ports:?}"))
        );
        for (i, chunk) in endpoints.chunks(MAX_PER_SLICE).enumerate() {
            let name = if i == 0 {
                base.clone()
            } else {
                format!("{base}-{i}")
            };
            slices.push(slice(name, Some(ports_json(&ports)), chunk.to_vec()));
        }
    }
    if slices.is_empty() {
        slices.push(slice(
            format!("{}-{}", &svc_name[..svc_name.len().min(50)], short_hash("")),
            None,
            Vec::new(),
        ));
    }
    (json!(subsets), slices)
}

/// The controller's state.
pub struct Controller {
    pub(crate) queue: Arc<Queue>,
    echoes: Arc<Echoes>,
}

/// The resourceVersions of the Endpoints and slices this controller last wrote, by store
/// key, until their change comes back through the informer: that change is the echo of a
/// write made from the Service's current pods, and needs no reconcile (kube-controller-
/// manager's EndpointSlice tracker skips its own writes the same way). Without it every
/// write was followed by a second reconcile of its Service that found nothing to do, at
/// 100 pods per Service a `desired` over all of them. A change by anyone else (another
/// version) still queues the Service, so drift is repaired.
///
/// Bounded: at most one entry per object written; any change or deletion of a key removes
/// its entry. An echo that comes before its write is recorded costs a reconcile, as before.
#[derive(Default)]
pub(crate) struct Echoes(Mutex<HashMap<String, String>>);

impl Echoes {
    /// Records this controller's write of `obj` (as the store returned it) under `key`.
    fn wrote(&self, key: String, obj: &Value) {
        if let Some(rv) = obj.ptr("/metadata/resourceVersion").and_then(Value::as_str) {
            self.0
                .lock()
                .expect("not poisoned")
                .insert(key, rv.to_string());
        }
    }

    /// Whether `c` is the echo of this controller's last write of its key (forgetting the
    /// write either way).
    fn is_echo(&self, c: &super::informer::Change<'_>) -> bool {
        let Some(mine) = self.0.lock().expect("not poisoned").remove(c.key) else {
            return false;
        };
        !c.replay
            && c.new
                .and_then(|n| n.ptr("/metadata/resourceVersion"))
                .and_then(Value::as_str)
                == Some(mine.as_str())
    }
}

impl Controller {
    /// Wires the controller: a Service change queues it; a pod change queues every Service
    /// of its namespace that selects it (before or after); a change to an Endpoints object
    /// or a managed slice queues its Service (to repair drift).
    pub fn new(ctx: &Ctx) -> Controller {
        let queue = Arc::new(Queue::default());
        let echoes = Arc::new(Echoes::default());
        let svc_res = ctx.services.resource();
        {
            let q = queue.clone();
            ctx.services.subscribe(move |c| q.add(c.key));
        }
        {
            let q = queue.clone();
            let services = ctx.services.clone();
            ctx.pods.subscribe(move |c| {
                // Every Service is queued by its own replay.
                if c.replay {
                    return;
                }
                let obj = c.new.or(c.old).expect("a change has an object");
                let ns = owner::namespace(obj);
                for svc in services.in_namespace(ns) {
                    if c.old.is_some_and(|o| selects(&svc, o))
                        || c.new.is_some_and(|n| selects(&svc, n))
                    {
                        q.add(&svc_res.key(ns, owner::name(&svc)));
                    }
                }
            });
        }
        {
            let q = queue.clone();
            let echoes = echoes.clone();
            ctx.endpoints.subscribe(move |c| {
                if echoes.is_echo(c) {
                    return;
                }
                let obj = c.new.or(c.old).expect("a change has an object");
                q.add(&svc_res.key(owner::namespace(obj), owner::name(obj)));
            });
        }
        {
            let q = queue.clone();
            let echoes = echoes.clone();
            ctx.endpointslices.subscribe(move |c| {
                if echoes.is_echo(c) {
                    return;
                }
                let obj = c.new.or(c.old).expect("a change has an object");
                let labels = obj.ptr("/metadata/labels");
                let managed = labels
                    .and_then(|l| l.get(MANAGED_BY))
                    .and_then(Value::as_str)
                    == Some(SLICE_MANAGER);
                if let (true, Some(svc)) = (
                    managed,
                    labels
                        .and_then(|l| l.get(SERVICE_NAME))
                        .and_then(Value::as_str),
                ) {
                    q.add(&svc_res.key(owner::namespace(obj), svc));
                }
            });
        }
        Controller { queue, echoes }
    }

    /// Reconciles one Service's Endpoints and slices by the Service's store key.
    pub async fn reconcile(&self, ctx: &Ctx, key: &str) -> Result<Option<Duration>, KubeError> {
        let Some((ns, name)) = key
            .strip_prefix(ctx.services.resource().prefix().as_str())
            .and_then(|rest| rest.split_once('/'))
        else {
            return Ok(None);
        };
        let (ns, name) = (ns.to_string(), name.to_string());
        let ep_res = ctx.endpoints.resource();
        let slice_res = ctx.endpointslices.resource();
        let ours = |s: &Value| {
            owner::namespace(s) == Some(ns.as_str())
                && s.ptr(&format!(
                    "/metadata/labels/{}",
                    SERVICE_NAME.replace('/', "~1")
                ))
                .and_then(Value::as_str)
                    == Some(name.as_str())
                && s.ptr(&format!(
                    "/metadata/labels/{}",
                    MANAGED_BY.replace('/', "~1")
                ))
                .and_then(Value::as_str)
                    == Some(SLICE_MANAGER)
        };
        let existing_slices: Vec<Arc<Value>> = ctx
            .endpointslices
            .in_namespace(Some(ns.as_str()))
            .into_iter()
            .filter(|s| ours(s))
            .collect();
        let existing_ep = ctx.endpoints.get(&ep_res.key(Some(&ns), &name));
        let svc = ctx.services.get(key).filter(|s| !owner::is_deleting(s));
        let Some(svc) = svc.filter(|s| selector(s).is_some()) else {
            // No Service (or no selector): our Endpoints and slices go.
            // Only Endpoints this controller wrote: a hand-made one without a Service stays.
            let gone = ctx.services.get(key).is_none();
            let ours = existing_ep.as_ref().is_some_and(|ep| {
                ep.ptr("/metadata/managedFields")
                    .and_then(Value::as_array)
                    .is_some_and(|m| {
                        m.iter()
                            .any(|e| e.get("manager").and_then(Value::as_str) == Some(MANAGER))
                    })
            });
            if gone && ours {
                let call = Call::internal(ep_res, Some(&ns), Some(&name), None, MANAGER);
                ignore_conflict(ctx.api.delete_value(&call, None).await)?;
            }
            for s in existing_slices {
                let call =
                    Call::internal(slice_res, Some(&ns), Some(owner::name(&s)), None, MANAGER);
                ignore_conflict(ctx.api.delete_value(&call, None).await)?;
            }
            return Ok(None);
        };
        // The pods carrying the selector's rarest label (`desired` checks the rest).
        let pods = selector(&svc)
            .and_then(|sel| {
                sel.iter()
                    .filter_map(|(k, v)| Some(pod::label_index(Some(&ns), k, v.as_str()?)))
                    .min_by_key(|value| ctx.pods.index_len(pod::BY_LABEL, value))
            })
            .map(|value| ctx.pods.by_index(pod::BY_LABEL, &value))
            .unwrap_or_default();
        let (subsets, slices) = desired(&svc, &pods);
        // Endpoints.
        let labels = svc
            .ptr("/metadata/labels")
            .cloned()
            .unwrap_or_else(|| json!({}));
        match existing_ep {
            None => {
                let ep = json!({"apiVersion": "v1", "kind": "Endpoints",
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "subsets": subsets});
                let call = Call::internal(ep_res, Some(&ns), None, None, MANAGER);
                match ctx.api.create_value(&call, ep, false).await {
                    Ok(o) => self.echoes.wrote(ep_res.key(Some(&ns), &name), &o),
                    Err(e) if e.code == 409 && e.reason == "AlreadyExists" => {}
                    Err(e) => return Err(e),
                }
            }
            Some(cur) => {
                let have_subsets = cur.get("subsets").cloned().unwrap_or_else(|| json!([]));
                let have_labels = cur
                    .ptr("/metadata/labels")
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                if have_subsets != subsets || have_labels != labels {
                    let mut next = (*cur).clone();
                    next["subsets"] = subsets;
                    next["metadata"]["labels"] = labels;
                    let call = Call::internal(ep_res, Some(&ns), Some(&name), None, MANAGER);
                    match ctx.api.update_value(&call, next).await {
                        Ok(o) => self.echoes.wrote(ep_res.key(Some(&ns), &name), &o),
                        Err(e) => ignore_conflict(Err(e))?,
                    }
                }
            }
        }
        // EndpointSlices.
        let wanted: BTreeMap<&str, &Value> = slices.iter().map(|s| (owner::name(s), s)).collect();
        for s in &existing_slices {
            if !wanted.contains_key(owner::name(s)) {
                let call =
                    Call::internal(slice_res, Some(&ns), Some(owner::name(s)), None, MANAGER);
                ignore_conflict(ctx.api.delete_value(&call, None).await)?;
            }
        }
        for (slice_name, want) in wanted {
            let cur = existing_slices
                .iter()
                .find(|s| owner::name(s) == slice_name);
            match cur {
                None => {
                    let call = Call::internal(slice_res, Some(&ns), None, None, MANAGER);
                    match ctx.api.create_value(&call, want.clone(), false).await {
                        Ok(o) => self.echoes.wrote(slice_res.key(Some(&ns), slice_name), &o),
                        Err(e) if e.code == 409 && e.reason == "AlreadyExists" => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(cur) => {
                    let same = cur.get("endpoints") == want.get("endpoints")
                        && cur.get("ports") == want.get("ports")
                        && cur.ptr("/metadata/labels") == want.ptr("/metadata/labels");
                    if !same {
                        let mut next = (**cur).clone();
                        next["endpoints"] = want["endpoints"].clone();
                        match want.get("ports") {
                            Some(p) => next["ports"] = p.clone(),
                            None => {
                                if let Some(o) = next.as_object_mut() {
                                    o.remove("ports");
                                }
                            }
                        }
                        next["metadata"]["labels"] = want["metadata"]["labels"].clone();
                        let call =
                            Call::internal(slice_res, Some(&ns), Some(slice_name), None, MANAGER);
                        match ctx.api.update_value(&call, next).await {
                            Ok(o) => self.echoes.wrote(slice_res.key(Some(&ns), slice_name), &o),
                            Err(e) => ignore_conflict(Err(e))?,
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_echo_of_the_controllers_own_last_write_is_skipped() {
        use super::super::informer::Change;
        let at = |rv: &str| Arc::new(json!({"metadata": {"name": "web", "resourceVersion": rv}}));
        let change = |key, old, new| Change {
            key,
            old,
            new,
            replay: false,
        };
        let e = Echoes::default();
        let (v5, v6, v7) = (at("5"), at("6"), at("7"));
        // Nothing written: every change counts.
        assert!(!e.is_echo(&change("k", None, Some(&v5))));
        // Our write at 6 comes back: skipped, once.
        e.wrote("k".into(), &v6);
        assert!(!e.is_echo(&change("other", None, Some(&v6))), "another key");
        assert!(e.is_echo(&change("k", Some(&v5), Some(&v6))));
        assert!(!e.is_echo(&change("k", Some(&v5), Some(&v6))), "only once");
        // Someone else's write after ours: it counts, and forgets ours.
        e.wrote("k".into(), &v6);
        assert!(!e.is_echo(&change("k", Some(&v6), Some(&v7))));
        assert!(e.0.lock().unwrap().is_empty());
        // A deletion counts (the Service's Endpoints must come back), and forgets ours.
        e.wrote("k".into(), &v7);
        assert!(!e.is_echo(&change("k", Some(&v7), None)));
        // A replay is never an echo.
        e.wrote("k".into(), &v7);
        let replay = Change {
            key: "k",
            old: None,
            new: Some(&v7),
            replay: true,
        };
        assert!(!e.is_echo(&replay));
        assert!(e.0.lock().unwrap().is_empty(), "bounded: nothing left over");
    }

    fn svc(ports: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "s-1"},
               "spec": {"selector": {"app": "web"}, "ports": ports}})
    }

    fn pod(name: &str, ip: &str, ready: bool, ports: Value) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {"name": name, "namespace": "d", "uid": format!("u-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}))
    }

    #[test]
    fn ready_and_not_ready_pods_with_ports_resolved_by_name() {
        let s = svc(json!([{"name": "http", "port": 80, "targetPort": "web"}]));
        let pods = vec![
            pod(
                "a",
                "10.0.0.2",
                true,
                json!([{"name": "web", "containerPort": 8080}]),
            ),
            pod(
                "b",
                "10.0.0.3",
                false,
                json!([{"name": "web", "containerPort": 8080}]),
            ),
            // Names the port differently: a separate subset.
            pod(
                "c",
                "10.0.0.4",
                true,
                json!([{"name": "web", "containerPort": 9090}]),
            ),
            // Does not name the port at all: no endpoint.
            pod("d", "10.0.0.5", true, json!([])),
            // No IP yet.
            pod(
                "e",
                "",
                true,
                json!([{"name": "web", "containerPort": 8080}]),
            ),
        ];
        let (subsets, slices) = desired(&s, &pods);
        let subsets = subsets.as_array().unwrap().clone();
        assert_eq!(subsets.len(), 2, "{subsets:?}");
        let s8080 = subsets
            .iter()
            .find(|x| x["ports"][0]["port"] == 8080)
            .unwrap();
        assert_eq!(s8080["addresses"][0]["ip"], "10.0.0.2");
        assert_eq!(s8080["notReadyAddresses"][0]["ip"], "10.0.0.3");
        assert_eq!(s8080["ports"][0]["name"], "http");
        assert_eq!(slices.len(), 2);
        let total: usize = slices
            .iter()
            .map(|s| s["endpoints"].as_array().unwrap().len())
            .sum();
        assert_eq!(total, 3);
    }

    #[test]
    fn terminating_pods_leave_endpoints_but_stay_in_slices_and_big_sets_are_split() {
        let s = svc(json!([{"port": 80}]));
        let mut pods: Vec<Arc<Value>> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.1.{}.{}", i / 200, i % 200),
                    true,
                    json!([]),
                )
            })
            .collect();
        let mut going = (*pods[0]).clone();
        going["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
        pods[0] = Arc::new(going);
        let (subsets, slices) = desired(&s, &pods);
        assert_eq!(subsets[0]["addresses"].as_array().unwrap().len(), 249);
        assert_eq!(slices.len(), 3);
        let terminating: Vec<&Value> = slices
            .iter()
            .flat_map(|s| s["endpoints"].as_array().unwrap())
            .filter(|e| e["conditions"]["terminating"] == true)
            .collect();
        assert_eq!(terminating.len(), 1);
        assert_eq!(terminating[0]["conditions"]["ready"], false);
        // Nothing selected: no subsets and one empty placeholder slice.
        let (subsets, slices) = desired(&s, &[]);
        assert_eq!(subsets, json!([]));
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0]["endpoints"], json!([]));
    }
}
