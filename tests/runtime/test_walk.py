"""Walking, opening and removing a job's files through directory handles (real file systems)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pgpu.runtime._outputs import OutputLimitExceeded, collect_outputs, open_sealed, seal_outputs
from p2pgpu.runtime._walk import make_dirs_beneath, open_beneath, remove_tree, walk

_DIR = os.O_RDONLY | os.O_DIRECTORY


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "work"
    d.mkdir()
    fd = os.open(d, _DIR)
    try:
        yield d, fd
    finally:
        os.close(fd)


def deep_tree(base: Path, levels: int, name: str = "d" * 200) -> None:
    """A chain of ``levels`` directories (longer than PATH_MAX past ~20) with a file at the bottom."""
    fd = os.open(base, _DIR)
    for _ in range(levels):
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, _DIR, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(os.open("bottom.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)


def test_walk_lists_regular_files_never_links(root: tuple[Path, int], tmp_path: Path) -> None:
    d, fd = root
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("bb")
    (d / "a.txt").write_text("a")
    (tmp_path / "secret").write_text("s")
    (d / "link").symlink_to(tmp_path / "secret")
    (d / "dirlink").symlink_to(tmp_path)
    os.mkfifo(d / "fifo")
    w = walk(fd, entries_max=100, files_max=100)
    assert w.files == [("a.txt", 1), ("sub/b.txt", 2)] and w.problem == ""
    assert w.entries == 6 and w.bytes == 3


def test_walk_past_path_max_never_raises(root: tuple[Path, int]) -> None:
    d, fd = root
    deep_tree(d, 30)  # 30 * 201 bytes: past PATH_MAX (4096)
    w = walk(fd, entries_max=1000, files_max=10)
    assert w.files == [] and "nested deeper" in w.problem
    with pytest.raises(OutputLimitExceeded, match="nested deeper"):
        collect_outputs(d, 10, 1 << 20, 1 << 20)


def test_walk_is_bounded(root: tuple[Path, int]) -> None:
    d, fd = root
    for i in range(50):
        (d / f"e{i:02}").mkdir()
    w = walk(fd, entries_max=20, files_max=10)
    assert w.entries == 21 and w.problem == "more than 20 entries"
    for i in range(5):
        (d / f"f{i}").write_text("x")
    w = walk(fd, entries_max=1000, files_max=3)
    assert w.problem == "more than 3 output files" and len(w.files) == 4


def test_open_beneath_refuses_links_at_every_step(root: tuple[Path, int], tmp_path: Path) -> None:
    d, fd = root
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "key").write_text("KEY")
    (d / "ok").mkdir()
    (d / "ok" / "f").write_text("fine")
    (d / "hop").symlink_to(tmp_path / "outside")
    (d / "ok" / "key").symlink_to(tmp_path / "outside" / "key")
    got = open_beneath(fd, "ok/f")
    assert os.read(got, 10) == b"fine"
    os.close(got)
    for rel in ("hop/key", "ok/key"):
        with pytest.raises(OSError):
            open_beneath(fd, rel)
    for rel in ("../work/ok/f", "/etc/passwd", "ok//f", "", "ok/./f"):
        with pytest.raises(ValueError):
            open_beneath(fd, rel)


def test_seal_copies_regular_files_out_and_drops_special_bits(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "bin").write_bytes(b"\x7fELF")
    os.chmod(src / "bin", 0o6755)
    (src / "deep" / "er").mkdir(parents=True)
    (src / "deep" / "er" / "x.txt").write_text("x")
    (src / "to-secret").symlink_to("/etc/hostname")
    outs = seal_outputs(src, dest, files_max=10, file_bytes_max=100, bytes_max=100)
    assert [o.path for o in outs] == ["bin", "deep/er/x.txt"]
    assert (dest / "bin").read_bytes() == b"\x7fELF" and (dest / "bin").stat().st_mode & 0o7777 == 0o644
    assert not (dest / "to-secret").exists()
    fd = open_sealed(dest, "deep/er/x.txt")
    assert os.read(fd, 10) == b"x"
    os.close(fd)


def test_seal_over_a_limit_leaves_nothing(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "a").write_bytes(b"1" * 60)
    (src / "b").write_bytes(b"2" * 60)
    with pytest.raises(OutputLimitExceeded, match="total"):
        seal_outputs(src, dest, files_max=10, file_bytes_max=100, bytes_max=100)
    assert list(dest.iterdir()) == []


def test_make_dirs_beneath_does_not_follow_a_link(root: tuple[Path, int], tmp_path: Path) -> None:
    d, fd = root
    (tmp_path / "elsewhere").mkdir()
    (d / "a").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        make_dirs_beneath(fd, "a/b")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_remove_tree_past_path_max_and_through_links(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious").write_text("keep me")
    deep_tree(victim, 30)
    (victim / "link").symlink_to(tmp_path / "keep")
    for i in range(100):
        (victim / f"e{i}").mkdir()
    assert remove_tree(str(victim)) == ""
    assert not victim.exists()
    assert (tmp_path / "keep" / "precious").read_text() == "keep me"
    assert remove_tree(str(victim)) == ""  # already gone: nothing to do
