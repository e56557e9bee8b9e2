"""The official Kubernetes Python client (37.x, pydantic-validated models) against Flotilla.

Run by tests/python.rs with FLOTILLA_SERVER=http://host:port. Exits non-zero on the first
failed expectation; prints what it checked.
"""

import os
import sys

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

cfg = client.Configuration()
cfg.host = os.environ["FLOTILLA_SERVER"]
api = client.ApiClient(cfg)
core = client.CoreV1Api(api)
apps = client.AppsV1Api(api)
ns = "py-test"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


# Discovery through the typed API (needs singularName on every resource).
res = core.get_api_resources()
check(any(r.name == "pods" for r in res.resources), "core/v1 resources list pods")

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
check(core.read_namespace(ns).status.phase == "Active", "namespace is Active")

# ConfigMaps: typed CRUD.
cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm1", labels={"app": "py"}), data={"a": "1"})
created = core.create_namespaced_config_map(ns, cm)
check(created.metadata.resource_version, "create returns a resourceVersion")
created.data["b"] = "2"
replaced = core.replace_namespaced_config_map("cm1", ns, created)
check(replaced.data == {"a": "1", "b": "2"}, "replace updates data")
patched = core.patch_namespaced_config_map("cm1", ns, {"data": {"c": "3"}})
check(patched.data["c"] == "3", "patch (strategic merge) adds a key")
created.metadata.resource_version = created.metadata.resource_version  # stale now
try:
    core.replace_namespaced_config_map("cm1", ns, created)
    check(False, "a stale replace must conflict")
except ApiException as e:
    check(e.status == 409, "a stale replace gets 409")

# Pods: create, read, list across namespaces, delete returns the pod.
pod = client.V1Pod(
    metadata=client.V1ObjectMeta(name="p1"),
    spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
)
p = core.create_namespaced_pod(ns, pod)
check(p.status.phase == "Pending", "a new pod is Pending")
check(p.spec.restart_policy == "Always", "pod defaults are applied")
check(any(x.metadata.name == "p1" for x in core.list_pod_for_all_namespaces().items), "list across namespaces")
deleted = core.delete_namespaced_pod("p1", ns)
check(deleted.metadata.name == "p1", "delete returns the pod (an unbound pod goes at once)")
try:
    core.read_namespaced_pod("p1", ns)
    check(False, "a deleted pod must be gone")
except ApiException as e:
    check(e.status == 404, "reading a deleted pod gets 404")

# Deployments and the scale subresource.
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="d1"),
    spec=client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "d1"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "d1"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="nginx:1.25")]),
        ),
    ),
)
apps.create_namespaced_deployment(ns, dep)
scale = apps.patch_namespaced_deployment_scale("d1", ns, {"spec": {"replicas": 3}})
check(scale.spec.replicas == 3, "patching the scale subresource")
check(apps.read_namespaced_deployment("d1", ns).spec.replicas == 3, "scale updates the deployment")

# Watch from a list's resourceVersion replays exactly the changes since (test_watch).
rv = core.list_namespaced_config_map(ns).metadata.resource_version
core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="w1")))
core.patch_namespaced_config_map("w1", ns, {"data": {"x": "y"}})
core.delete_namespaced_config_map("w1", ns)
core.delete_namespaced_config_map("cm1", ns)
seen = []
w = watch.Watch()
for event in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=3):
    seen.append((event["type"], event["object"].metadata.name))
    if len(seen) == 4:
        w.stop()
check(seen == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1"), ("DELETED", "cm1")], f"watch replays history: {seen}")

# A watch without a resourceVersion starts with the current objects.
core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="now")))
first = next(iter(watch.Watch().stream(core.list_namespaced_config_map, ns, timeout_seconds=2)))
check(first["type"] == "ADDED" and first["object"].metadata.name == "now", "a fresh watch lists current objects")

try:
    core.read_namespaced_config_map("nope", ns)
    check(False, "reading a missing object must fail")
except ApiException as e:
    check(e.status == 404 and '"reason":"NotFound"' in e.body, "404 carries a NotFound Status")

# Server-side apply through the dynamic client (legacy discovery, apply-patch+yaml).
from kubernetes import dynamic  # noqa: E402

dyn = dynamic.DynamicClient(api)
cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
ssa = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "namespace": ns}, "data": {"a": "1"}}
r = cms.server_side_apply(body=ssa, namespace=ns, field_manager="python-ssa")
check(r.data.a == "1", "server-side apply creates")
check(
    any(m.manager == "python-ssa" and m.operation == "Apply" for m in r.metadata.managedFields),
    "the applier is recorded in managedFields",
)
core.patch_namespaced_config_map("ssa", ns, {"data": {"a": "2"}}, field_manager="editor")
try:
    cms.server_side_apply(body=ssa, namespace=ns, field_manager="python-ssa")
    check(False, "applying over another manager's change must conflict")
except ApiException as e:
    check(
        e.status == 409 and 'conflict with \\"editor\\" using v1: .data.a' in e.body,
        f"a conflicting apply gets 409 naming the manager and field: {e.body}",
    )
r = cms.server_side_apply(body=ssa, namespace=ns, field_manager="python-ssa", force_conflicts=True)
check(r.data.a == "1", "force_conflicts takes the field over")
check(all(m.manager != "editor" for m in r.metadata.managedFields), "the editor no longer owns anything")

# Real YAML bodies: an apply patch and a create.
import urllib.request  # noqa: E402

server = os.environ["FLOTILLA_SERVER"]


def send(method, path, body, content_type):
    req = urllib.request.Request(server + path, data=body, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req) as resp:
        return resp.status


yml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: yml\ndata:\n  k: v  # a comment\n"
check(send("PATCH", f"/api/v1/namespaces/{ns}/configmaps/yml?fieldManager=curl", yml, "application/apply-patch+yaml") == 201, "a YAML apply patch creates")
check(core.read_namespaced_config_map("yml", ns).data == {"k": "v"}, "the YAML body was read")
try:
    send("PATCH", f"/api/v1/namespaces/{ns}/configmaps/yml", yml, "application/apply-patch+yaml")
    check(False, "an apply patch without a field manager must fail")
except urllib.error.HTTPError as e:
    check(e.code == 422 and b"fieldManager: Required value" in e.read(), "an apply patch needs fieldManager (422)")
check(send("POST", f"/api/v1/namespaces/{ns}/configmaps", yml.replace(b"name: yml", b"name: yml2"), "application/yaml") == 201, "a YAML create")
try:
    send("POST", f"/api/v1/namespaces/{ns}/configmaps", b"\x0a\x02v1", "application/vnd.kubernetes.protobuf")
    check(False, "protobuf must be refused")
except urllib.error.HTTPError as e:
    check(e.code == 415 and b"send JSON" in e.read(), "protobuf gets 415 saying to send JSON")

# Typed CRUD for every served resource: create, read, list, patch, delete.
batch = client.BatchV1Api(api)
coord = client.CoordinationV1Api(api)
disco = client.DiscoveryV1Api(api)


def crud(kind, group, suffix, body, namespaced=True):
    prefix = "namespaced_" if namespaced else ""
    args = (ns,) if namespaced else ()
    name = body["metadata"]["name"]
    made = getattr(group, f"create_{prefix}{suffix}")(*args, body)
    check(made.metadata.name == name and made.metadata.uid, f"{kind}: create")
    got = getattr(group, f"read_{prefix}{suffix}")(name, *args)
    check(got.metadata.uid == made.metadata.uid, f"{kind}: read")
    items = getattr(group, f"list_{prefix}{suffix}")(*args).items
    check(any(i.metadata.name == name for i in items), f"{kind}: list")
    patched = getattr(group, f"patch_{prefix}{suffix}")(name, *args, {"metadata": {"labels": {"patched": "yes"}}})
    check(patched.metadata.labels.get("patched") == "yes", f"{kind}: patch")
    getattr(group, f"delete_{prefix}{suffix}")(name, *args)
    try:
        left = getattr(group, f"read_{prefix}{suffix}")(name, *args)
        check(left.metadata.deletion_timestamp is not None, f"{kind}: delete (terminating)")
    except ApiException as e:
        check(e.status == 404, f"{kind}: delete")


template = {"metadata": {"labels": {"app": "typed"}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1"]}]}}
selector = {"matchLabels": {"app": "typed"}}
crud("Secret", core, "secret", {"metadata": {"name": "s1"}, "stringData": {"k": "v"}})
crud("Service", core, "service", {"metadata": {"name": "svc1"}, "spec": {"selector": {"app": "typed"}, "ports": [{"port": 80}]}})
crud("Endpoints", core, "endpoints", {"metadata": {"name": "manual"}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]})
crud("Event", core, "event", {"metadata": {"name": "e1"}, "involvedObject": {"kind": "Pod", "name": "x", "namespace": ns}, "reason": "Test", "message": "m", "type": "Normal"})
crud("ServiceAccount", core, "service_account", {"metadata": {"name": "sa1"}})
crud("Node", core, "node", {"metadata": {"name": "py-node"}}, namespaced=False)
crud("ReplicaSet", apps, "replica_set", {"metadata": {"name": "rs1"}, "spec": {"replicas": 0, "selector": selector, "template": template}})
crud("DaemonSet", apps, "daemon_set", {"metadata": {"name": "ds1"}, "spec": {"selector": selector, "template": template}})
crud("Job", batch, "job", {"metadata": {"name": "j1"}, "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": template["spec"]["containers"]}}}})
crud("Lease", coord, "lease", {"metadata": {"name": "l1"}, "spec": {"holderIdentity": "me", "leaseDurationSeconds": 10}})
crud("EndpointSlice", disco, "endpoint_slice", {"metadata": {"name": "es1"}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.2"]}], "ports": [{"port": 80, "protocol": "TCP"}]})

# Subresources through the typed API.
apps.create_namespaced_replica_set(ns, {"metadata": {"name": "rs2"}, "spec": {"replicas": 0, "selector": selector, "template": template}})
check(apps.read_namespaced_replica_set_scale("rs2", ns).spec.replicas == 0, "ReplicaSet scale: read")
apps.patch_namespaced_replica_set_scale("rs2", ns, {"spec": {"replicas": 0}})
check(apps.read_namespaced_replica_set_status("rs2", ns).metadata.name == "rs2", "ReplicaSet status: read")
check(apps.read_namespaced_deployment_status("d1", ns).metadata.name == "d1", "Deployment status: read")
apps.create_namespaced_daemon_set(ns, {"metadata": {"name": "ds2"}, "spec": {"selector": selector, "template": template}})
check(apps.read_namespaced_daemon_set_status("ds2", ns).metadata.name == "ds2", "DaemonSet status: read")
batch.create_namespaced_job(ns, {"metadata": {"name": "j2"}, "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": template["spec"]["containers"]}}}})
check(batch.read_namespaced_job_status("j2", ns).metadata.name == "j2", "Job status: read")
core.create_node({"metadata": {"name": "py-node2"}})
n = core.patch_node_status("py-node2", {"status": {"capacity": {"cpu": "2"}}})
check(n.status.capacity["cpu"] == "2", "Node status: patch")
core.create_namespaced_pod(ns, {"metadata": {"name": "p2", "labels": {"app": "other"}}, "spec": template["spec"]})
st = core.patch_namespaced_pod_status("p2", ns, {"status": {"message": "hi"}})
check(st.status.message == "hi", "Pod status: patch")
try:
    core.read_namespaced_pod_log("p2", ns)
    check(False, "the log of a pod that has not started must be refused")
except ApiException as e:
    check(e.status == 400 and b"waiting to start" in (e.body.encode() if isinstance(e.body, str) else e.body), "Pod log: 400 while it waits to start")
core.create_namespaced_pod_binding("p2", ns, {"metadata": {"name": "p2"}, "target": {"kind": "Node", "name": "py-node2"}}, _preload_content=False)
check(core.read_namespaced_pod("p2", ns).spec.node_name == "py-node2", "Pod binding: create")
core.create_namespaced_pod_eviction("p2", ns, {"metadata": {"name": "p2", "namespace": ns}})
check(core.read_namespaced_pod("p2", ns).metadata.deletion_timestamp is not None, "Pod eviction: create")
core.delete_node("py-node2")

core.delete_namespace(ns)
print("all Python client checks passed")
