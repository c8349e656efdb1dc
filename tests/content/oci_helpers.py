"""Build a small OCI image from busybox and push it to a real registry (a
helper module for the tests, imported by name; not a test file).

The registry is Debian's ``docker-registry`` (the CNCF distribution server),
started on 127.0.0.1 with storage in a temporary directory; the image is
pushed with ``skopeo`` from an OCI layout the helper writes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "ls", "sha256sum", "id", "env", "pwd", "touch", "sleep", "true", "wc")
OS_RELEASE = 'PRETTY_NAME="p2pgpu test image (busybox)"\nID=p2pgpu-busybox\nVERSION_ID="1"\n'


def have_tools() -> str | None:
    """Why the OCI tests cannot run here, or None."""
    for tool in ("docker-registry", "skopeo", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test installs docker-registry, skopeo, busybox-static)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def registry(tmp: Path) -> Iterator[str]:
    """A docker-registry on 127.0.0.1; yields ``127.0.0.1:PORT``."""
    port = _free_port()
    cfg = tmp / "registry.yml"
    (tmp / "registry-data").mkdir(exist_ok=True)
    cfg.write_text(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {tmp / 'registry-data'}
http:
  addr: 127.0.0.1:{port}
""")
    with open(tmp / "registry.log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp / "registry.log").read_text()) from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            ti.mtime = 0
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    diff_id = hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), mtime=0), diff_id


def busybox_layer(extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None) -> tuple[bytes, str]:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def d(name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        entries.append((ti, None))

    def f(name: str, data: bytes, mode: int = 0o644) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode = len(data), mode
        entries.append((ti, data))

    for name in ("bin", "etc", "usr", "usr/bin"):
        d(name)
    f("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    for applet in APPLETS:
        ti = tarfile.TarInfo(f"bin/{applet}")
        ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
        entries.append((ti, None))
    f("etc/os-release", OS_RELEASE.encode())
    entries += extra or []
    return _tar_gz(entries)


@dataclass
class Image:
    ref: str        # REGISTRY/NAME@sha256:DIGEST
    digest: str     # hex
    layers: list[str]


def push_image(reg: str, name: str, tmp: Path, layers: list[tuple[bytes, str]]) -> Image:
    """Write an OCI layout with ``layers`` ((gzip bytes, diff id) each) and push it with skopeo."""
    layout = tmp / f"layout-{name.replace('/', '-')}"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return h

    layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{blob(g)}",
                    "size": len(g)} for g, _ in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/usr/bin:/bin", "IMAGE_VAR=from-image"]},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for _, d in layers]}},
                        sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": f"sha256:{blob(config)}", "size": len(config)},
                           "layers": layer_descs}, sort_keys=True).encode()
    mdigest = blob(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{mdigest}",
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    res = subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false",
                          f"oci:{layout}:v1", f"docker://{reg}/{name}:v1"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)},
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {res.stderr}")
    return Image(ref=f"{reg}/{name}@sha256:{mdigest}", digest=mdigest,
                 layers=[d["digest"][7:] for d in layer_descs])
