"""A job in an OCI image's root under bubblewrap (runtime/_oci_root.py), with
a real busybox root unpacked by the node's own unpacker: the job sees the
image's /etc/os-release, not the host's; the root is read-only; /work is
writable; the image's Env is under the manifest's; no network."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from oci_helpers import OS_RELEASE, busybox_layer, have_tools

from p2pgpu.content._unpack import unpack_layer
from p2pgpu.runtime import JobSpec, SandboxPolicy, check_sandbox, run_job

pytestmark = pytest.mark.skipif(have_tools() is not None or check_sandbox() is not None,
                                reason=str(have_tools() or check_sandbox()))


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("img") / "rootfs"
    root.mkdir()
    gz, _ = busybox_layer()
    unpack_layer(io.BytesIO(gz), root)
    for d in ("proc", "dev", "tmp", "work"):
        (root / d).mkdir(exist_ok=True)
    return root


async def run(spec: JobSpec) -> tuple[str, str, object]:
    out: list[bytes] = []
    err: list[bytes] = []

    async def on_line(stream: str, line: bytes) -> None:
        (out if stream == "stdout" else err).append(line)

    res = await run_job(spec, SandboxPolicy(), on_line=on_line)
    return b"\n".join(out).decode(), b"\n".join(err).decode(), res


async def test_the_job_sees_the_images_root_not_the_hosts(rootfs: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "x.txt").write_text("input\n")
    script = ("cat /etc/os-release; echo VAR=$IMAGE_VAR/$MINE; cat $P2PGPU_IN/x.txt; "
              "echo out > /work/result.txt; touch /bin/new 2>&1 || echo ro-root; "
              "ls /usr/bin/python3 2>&1 || echo no-host-python; id -u")
    spec = JobSpec(argv=("sh", "-c", script),
                   work_dir=work, inputs_dir=inputs, time_limit_ms=20_000, memory_bytes_max=256 << 20,
                   env={"MINE": "from-manifest"}, root_dir=rootfs,
                   image_env={"IMAGE_VAR": "from-image", "PATH": "/usr/bin:/bin"})
    out, err, res = await run(spec)
    assert res.ok, (out, err, res)
    assert OS_RELEASE.strip() in out
    assert Path("/etc/os-release").read_text().strip() not in out
    assert "VAR=from-image/from-manifest" in out
    assert "input" in out and "ro-root" in out and "no-host-python" in out
    assert out.strip().endswith("65534")
    assert (work / "result.txt").read_text() == "out\n"
    assert not (rootfs / "bin" / "new").exists()
    assert [o.path for o in res.outputs] == ["result.txt"]


async def test_no_network_in_an_image_job(rootfs: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    spec = JobSpec(argv=("sh", "-c", "cat /proc/net/dev | wc -l"), work_dir=work, time_limit_ms=20_000,
                   memory_bytes_max=256 << 20, root_dir=rootfs)
    out, err, res = await run(spec)
    assert res.ok, err
    assert int(out.strip()) == 3  # two header lines and lo: no other interface


async def test_a_missing_gpu_is_refused_and_a_gpu_job_gets_its_device_nodes(rootfs: Path, tmp_path: Path) -> None:
    from p2pgpu.runtime._oci_root import oci_bwrap_argv
    from p2pgpu.runtime._sandbox import JobRejected

    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).write_text("")
    work = tmp_path / "work"
    work.mkdir()
    spec = JobSpec(argv=("true",), work_dir=work, time_limit_ms=1000, memory_bytes_max=1 << 20, gpus=(1,),
                   root_dir=rootfs)
    argv = oci_bwrap_argv(spec, SandboxPolicy(dev_dir=dev))
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--dev-bind"]
    assert binds == [str(dev / "nvidia1"), str(dev / "nvidiactl"), str(dev / "nvidia-uvm")]
    assert argv[argv.index("--remount-ro") + 1] == "/"
    with pytest.raises(JobRejected):
        oci_bwrap_argv(JobSpec(argv=("true",), work_dir=work, time_limit_ms=1000, memory_bytes_max=1 << 20,
                               gpus=(3,), root_dir=rootfs), SandboxPolicy(dev_dir=dev))
    no_gpu = oci_bwrap_argv(JobSpec(argv=("true",), work_dir=work, time_limit_ms=1000, memory_bytes_max=1 << 20,
                                    root_dir=rootfs), SandboxPolicy(dev_dir=dev))
    assert "--dev-bind" not in no_gpu
