#!/usr/bin/env python3
"""Build an OCI image layout from directories, one gzip layer per directory (stdlib only).

    mkimage.py LAYOUT TAG DIR [DIR ...] [--cmd /bin/sh]

Used by the benchmarks to make test images without docker or buildah.
"""
import argparse, gzip, hashlib, io, json, os, tarfile

def blob(layout, data):
    d = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(layout, "blobs/sha256"), exist_ok=True)
    with open(os.path.join(layout, "blobs/sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d

def layer_tar(src):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                p = os.path.join(root, name)
                t.add(p, arcname=os.path.relpath(p, src), recursive=False)
    return buf.getvalue()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("layout"); ap.add_argument("tag"); ap.add_argument("dirs", nargs="+")
    ap.add_argument("--cmd", default="/bin/sh")
    a = ap.parse_args()
    layers, diff_ids = [], []
    for d in a.dirs:
        raw = layer_tar(d)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip.compress(raw, compresslevel=1)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(a.layout, gz), "size": len(gz)})
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    cfg = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": [a.cmd], "Env": ["PATH=/bin:/usr/bin"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids},
                      # one entry per layer: buildah refuses a base whose history does not list them
                      "history": [{"created_by": f"benches/mkimage.py layer {i}"} for i in range(len(diff_ids))]}).encode()
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(a.layout, cfg), "size": len(cfg)},
                      "layers": layers}).encode()
    md = blob(a.layout, man)
    with open(os.path.join(a.layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(a.layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                   "size": len(man), "annotations": {"org.opencontainers.image.ref.name": a.tag}}]}, f)
    print(md)

if __name__ == "__main__":
    main()
