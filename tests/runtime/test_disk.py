"""A job's disk: its size and inode count are the kernel's to enforce (real mounts, as root)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from p2pgpu.runtime._disk import (
    DiskUnavailable,
    image_bytes,
    make_job_disk,
    probe_disk_backend,
    remove_job_disk,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a job's disk needs root")


def fill(path: Path, total: int) -> int:
    """Write zeros to a file deleted while open, until ``total`` or ENOSPC; bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.unlink(path)
    written = 0
    block = bytes(1 << 20)
    try:
        while written < total:
            try:
                written += os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return written


@pytest.mark.parametrize("backend", ["loop", "tmpfs"])
def test_kernel_backends_bound_deleted_files_and_inodes(tmp_path: Path, backend: str) -> None:
    disk = make_job_disk(backend, tmp_path / "scratch", bytes_max=8 << 20, inodes_max=100)
    try:
        assert disk.mounted and os.path.ismount(disk.top)
        assert sorted(p.name for p in disk.top.iterdir()) == ["etc", "work"] and disk.inputs.is_dir()
        disk.set_baseline()
        written = fill(disk.work / "big", 64 << 20)
        assert written <= image_bytes(8 << 20, 100), written
        made = 0
        for i in range(1000):
            try:
                (disk.work / f"d{i}").mkdir()
                made += 1
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        assert made < 1000
        usage = disk.usage()
        assert usage is not None and usage[1] >= made
    finally:
        assert remove_job_disk(disk) == ""
    assert not disk.scratch.exists()


def test_dir_backend_is_a_plain_directory_and_says_so(tmp_path: Path) -> None:
    disk = make_job_disk("dir", tmp_path / "scratch", bytes_max=1 << 20, inodes_max=10)
    try:
        assert not disk.mounted and disk.usage() is None and not disk.kernel_enforced
    finally:
        assert remove_job_disk(disk) == ""
    assert not disk.scratch.exists()


def test_removal_after_many_entries_is_one_umount(tmp_path: Path) -> None:
    disk = make_job_disk("loop", tmp_path / "scratch", bytes_max=128 << 20, inodes_max=30_000)
    try:
        for i in range(20_000):
            os.mkdir(disk.work / f"e{i}")
    finally:
        assert remove_job_disk(disk) == ""
    assert not disk.scratch.exists()


def test_scratch_root_must_be_ours(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(DiskUnavailable, match="not a directory owned"):
        make_job_disk("dir", tmp_path / "link", bytes_max=1, inodes_max=1)


def test_probe_prefers_a_kernel_backend_and_refuses_unknown_ones(tmp_path: Path) -> None:
    backend, why = probe_disk_backend("auto", tmp_path / "scratch")
    assert backend == "loop" and why == ""
    assert probe_disk_backend("dir", tmp_path / "scratch") == ("dir", "")
    with pytest.raises(ValueError):
        probe_disk_backend("nfs", tmp_path / "scratch")
