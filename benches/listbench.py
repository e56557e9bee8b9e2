#!/usr/bin/env python3
"""Node-filtered LIST cost (issue "Scale"): three replicas of BINARY on 127.0.0.1:2666x,
10,000 pods bound to 1,000 nodes, then 500 lists of `/api/v1/pods?fieldSelector=
spec.nodeName=<node>` (what each node agent asks for on a relist), 64 at once, on a follower.
Prints lists/s, p50/p99, the follower's RSS and the failed requests.

usage: benches/listbench.py BINARY LABEL [SERVER FLAGS...]   (run it for two binaries, or
one binary with and without `--watch-cache-size 0`, to compare)
"""
import json, subprocess, sys, time, os, shutil, concurrent.futures, urllib.request
binary = sys.argv[1]
d = "/tmp/listbench"
shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
procs = []
import atexit
atexit.register(lambda: [p.kill() for p in procs])
for i in (1, 2, 3):
    procs.append(subprocess.Popen([binary, "server", "--id", str(i), "--data-dir", f"{d}/{i}",
        "--listen-api", f"127.0.0.1:2666{i}", "--listen-peer", f"127.0.0.1:2766{i}",
        "--initial-cluster", "1=127.0.0.1:27661,2=127.0.0.1:27662,3=127.0.0.1:27663",
        "--max-requests-inflight", "0", "--max-mutating-requests-inflight", "0"] + sys.argv[3:],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
def req(method, path, body=None, port=26661):
    r = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(r, timeout=60) as f:
        return f.read()
for _ in range(100):
    try:
        req("GET", "/api/v1/namespaces/default"); break
    except Exception:
        time.sleep(0.2)
def create(i):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "labels": {"app": "x"}},
           "spec": {"nodeName": f"n{i % 1000}", "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1"]}]}}
    req("POST", "/api/v1/namespaces/default/pods", pod)
with concurrent.futures.ThreadPoolExecutor(32) as ex:
    list(ex.map(create, range(10000)))
time.sleep(2)
errors = []
def lst(i):
    t = time.time()
    try:
        b = req("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3Dn{i % 1000}", port=26662)
        n = len(json.loads(b)["items"])
        assert n == 10, n
    except Exception as e:
        errors.append(str(e))
    return time.time() - t
def rss():
    return int(open(f"/proc/{procs[1].pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024
t = time.time()
with concurrent.futures.ThreadPoolExecutor(64) as ex:
    lat = sorted(ex.map(lst, range(500)))
el = time.time() - t
print(f"{sys.argv[2]}: 500 node-filtered lists of 10,000 pods, 64 at once: {500/el:.0f} lists/s, p50 {lat[250]*1000:.0f} ms, p99 {lat[495]*1000:.0f} ms, replica RSS after {rss()} MiB, errors {len(errors)} {errors[:2]}")
