"""OCI images end to end: a real registry (Debian's docker-registry) that the
test starts, an image built from busybox and pushed with skopeo, and real node
processes.  The job sees the image's /etc/os-release; a second job on the same
node starts from the cache; an image whose layer escapes its root is refused
with the reason on screen and nothing left in the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from oci_helpers import OS_RELEASE, busybox_layer, have_tools, push_image, registry

from p2pgpu.localnet import LocalNet
from p2pgpu.node._images import images_dir, sweep_orphan_caches
from p2pgpu.runtime._disk import scratch_root_default

pytestmark = [pytest.mark.processes, pytest.mark.skipif(have_tools() is not None, reason=str(have_tools()))]
MIX = [("NVIDIA L4", 23034, "8.9", 0), ("NVIDIA L4", 23034, "8.9", 1)]


def job(image: str, command: str) -> str:
    return f"""
name = "oci"
[requirements]
nodes = 1
[runtime]
kind = "oci"
image = "{image}"
command = ["sh", "-c", {json.dumps(command)}]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
"""


def submit_wait(net: LocalNet, tmp: Path, text: str, name: str, *,
                json_out: bool = True) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``job submit --wait``: with ``json_out=False`` the human output, as a person sees it."""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    res = subprocess.run([sys.executable, "-m", "p2pgpu.cli", "job", "submit", str(path), "--wait",
                          *(["--json"] if json_out else []),
                          "--timeout", "120", "--home", str(net.nodes[0].home.path)],
                         capture_output=True, text=True, timeout=200, check=False)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {}
    return res, doc


def test_oci_image_from_a_real_registry_runs_and_is_cached(tmp_path: Path) -> None:
    with registry(tmp_path) as reg:
        good = push_image(reg, "test/busybox", tmp_path, [busybox_layer()])
        evil_entry = tarfile.TarInfo("../../escaped-from-image")
        evil_entry.size = 6
        escaping = push_image(reg, "test/escape", tmp_path, [busybox_layer([(evil_entry, b"pwned\n")])])
        with LocalNet(tmp_path / "net", 2, gpu_mix=MIX,
                      config_extra=f'oci_insecure_registries = ["{reg}"]') as net:
            net.wait_until(lambda: any("oci" in r["runtimes"] for r in net.nodes[0].call("market")),
                           timeout_s=30, what="a node that runs oci")
            res, st = submit_wait(net, tmp_path, job(good.ref, "cat /etc/os-release; echo $IMAGE_VAR; "
                                                                "cat /proc/self/mountinfo"), "first")
            assert res.returncode == 0 and st["state"] == "succeeded", res.stdout + res.stderr
            logs = net.nodes[0].call("job.logs", {"job_id": st["job_id"]})
            out = "\n".join(ln["line"] for ln in logs if ln["stream"] == "stdout")
            assert OS_RELEASE.strip() in out and "from-image" in out
            # The job's mount table names no path of the node's home (its root
            # is bound from the cache under the scratch root).
            assert f"/{images_dir(net.nodes[1].home.path, Path('/')).name}/{good.digest}/rootfs / " in out, out
            for node in net.nodes:
                assert str(node.home.path.resolve()) not in out and str(node.home.path) not in out, out
            # The worker's advert now lists the image as cached (matching prefers warm nodes).
            worker = net.nodes[1].peer_id
            net.wait_until(lambda: any(r["peer_id"] == worker and good.digest in r["images"]
                                       for r in net.nodes[0].call("market")), timeout_s=30,
                           what="the worker's advert lists its cached image")
            assert Path("/etc/os-release").read_text().strip() not in out
            assert any("pulling" in ln["line"] for ln in logs if ln["stream"] == "stderr")
            # The layers are content-addressed blobs in the worker's store.
            held = {b["sha256"] for b in net.nodes[1].call("blobs.status")["blobs"]}
            assert set(good.layers) <= held
            # Second job on the same node: from the cache, no pull.
            res, st2 = submit_wait(net, tmp_path, job(good.ref, "cat /etc/os-release"), "second")
            assert res.returncode == 0 and st2["state"] == "succeeded", res.stdout + res.stderr
            logs2 = net.nodes[0].call("job.logs", {"job_id": st2["job_id"]})
            assert any("from the cache" in ln["line"] for ln in logs2), logs2
            counters = net.nodes[1].call("status")["counters"]
            assert counters["images:pulls"] == 1 and counters["images:cache_hits"] == 1
            # An image whose layer escapes its root: refused, reason on screen, nothing left behind.
            res, _ = submit_wait(net, tmp_path, job(escaping.ref, "cat /etc/os-release"), "escape", json_out=False)
            assert res.returncode == 1 and "state     failed" in res.stdout, res.stdout + res.stderr
            assert "'..' in a layer path" in res.stdout, res.stdout
            images = images_dir(net.nodes[1].home.path, scratch_root_default())
            assert sorted(os.listdir(images)) == [good.digest, "owner"]
            assert not list(tmp_path.rglob("escaped-from-image"))
            # A digest the registry does not have: refused with the registry's answer.
            missing = good.ref.split("@")[0] + "@sha256:" + hashlib.sha256(b"nothing").hexdigest()
            res, _ = submit_wait(net, tmp_path, job(missing, "true"), "missing", json_out=False)
            assert res.returncode == 1 and "HTTP 404" in res.stdout, res.stdout
    for i in range(2):  # the caches live outside tmp_path (in the scratch root)
        shutil.rmtree(images_dir(tmp_path / "net" / f"node{i}", scratch_root_default()), ignore_errors=True)


def test_image_caches_of_removed_homes_are_swept(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    live_home, gone_home = tmp_path / "live", tmp_path / "gone"
    live_home.mkdir()
    caches = {}
    for name, home in (("live", live_home), ("gone", gone_home), ("mine", tmp_path / "mine")):
        d = images_dir(home, scratch)
        (d / ("a" * 64)).mkdir(parents=True)
        (d / "owner").write_text(f"{home}\n")
        caches[name] = d
    unowned = scratch / "images-0123456789abcdef"
    unowned.mkdir()
    removed = sweep_orphan_caches(scratch, keep=caches["mine"])
    assert removed == [caches["gone"]]
    assert caches["live"].is_dir() and caches["mine"].is_dir() and unowned.is_dir()
    assert not caches["gone"].exists()
