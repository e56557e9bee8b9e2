#!/usr/bin/env python3
"""Builds small container images locally, as OCI image-layout tars (no registry needed).

    deploy/images/build.py OUT_DIR

writes OUT_DIR/busybox.tar (docker.io/library/busybox:1.35: the static busybox of Debian's
busybox-static with its applets, `sh` by default) and OUT_DIR/pause.tar
(docker.io/flotilla/pause:1: the same layer, sleeping until SIGTERM; the pod sandbox image).
Load them with `ctr -n k8s.io images import OUT_DIR/busybox.tar` (what the CRI tests do).
The layer is built reproducibly (fixed times and owners), so the digests are stable.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

BUSYBOX = "/bin/busybox"


def layer() -> bytes:
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add_dir(name, mode=0o755):
            i = tarfile.TarInfo(name)
            i.type, i.mode, i.mtime = tarfile.DIRTYPE, mode, 0
            t.addfile(i)
        for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "var", "var/run", "run"]:
            add_dir(d)
        add_dir("tmp", 0o1777)
        data = open(BUSYBOX, "rb").read()
        i = tarfile.TarInfo("bin/busybox")
        i.size, i.mode, i.mtime = len(data), 0o755, 0
        t.addfile(i, io.BytesIO(data))
        for a in sorted(set(applets)):
            a = a.lstrip("/")
            if a == "bin/busybox":
                continue
            i = tarfile.TarInfo(a)
            i.type, i.linkname, i.mtime = tarfile.SYMTYPE, "/bin/busybox", 0
            t.addfile(i)
        for name, text in [("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
                           ("etc/group", "root:x:0:\nnobody:x:65534:\n")]:
            b = text.encode()
            i = tarfile.TarInfo(name)
            i.size, i.mode, i.mtime = len(b), 0o644, 0
            t.addfile(i, io.BytesIO(b))
    return buf.getvalue()


def blob(t: tarfile.TarFile, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    i = tarfile.TarInfo(f"blobs/sha256/{digest}")
    i.size, i.mtime = len(data), 0
    t.addfile(i, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def image(path: str, name: str, cmd: list, layer_bytes: bytes) -> None:
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }, sort_keys=True).encode()
    with tarfile.open(path, "w") as t:
        l = blob(t, layer_bytes)
        c = blob(t, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **l}],
        }, sort_keys=True).encode()
        m = blob(t, manifest)
        for fname, body in [
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps({"schemaVersion": 2, "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
            }]}).encode()),
        ]:
            i = tarfile.TarInfo(fname)
            i.size, i.mtime = len(body), 0
            t.addfile(i, io.BytesIO(body))


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    lb = layer()
    image(os.path.join(out, "busybox.tar"), "docker.io/library/busybox:1.35", ["sh"], lb)
    image(os.path.join(out, "pause.tar"), "docker.io/flotilla/pause:1",
          ["sh", "-c", 'trap "exit 0" TERM; while :; do sleep 3600 & wait; done'], lb)
    print(f"wrote {out}/busybox.tar and {out}/pause.tar")


if __name__ == "__main__":
    main()
