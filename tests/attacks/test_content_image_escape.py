"""Attack: an OCI image whose layers try to write outside their root.

Each hostile layer is a real tar archive; unpacking it must refuse the image
(``UnsafeLayer``) or keep every byte inside the root, and never touch the
file the attack aims at.  Covered: ``..`` in names, absolute names, a link
planted in one layer and written through in the next (absolute and relative
targets, chains of links), hard links to host files, device files, whiteouts
that name ``..``, and the size limit.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from p2pgpu.content._unpack import UnpackLimits, UnsafeLayer, unpack_layer


def layer(*entries: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes], gz: bool = True) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for e in entries:
            if isinstance(e, tuple):
                tar.addfile(e[0], io.BytesIO(e[1]))
            else:
                tar.addfile(e)
    buf.seek(0)
    return buf


def f(name: str, data: bytes = b"pwned\n", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    return ti, data


def sym(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti


def d(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    return ti


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("safe\n")
    return outside


def untouched(victim: Path) -> bool:
    return sorted(os.listdir(victim)) == ["target"] and (victim / "target").read_text() == "safe\n"


@pytest.mark.parametrize("name", ["../outside/target", "a/../../outside/target", "/outside/target",
                                  "./../outside/pwned"])
def test_dotdot_and_absolute_names_refuse_the_image(tmp_path: Path, victim: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafeLayer):
        unpack_layer(layer(f(name)), root)
    assert untouched(victim)


@pytest.mark.parametrize("target", ["{victim}", "../../outside", "../outside", "/", "/../../.."])
def test_a_link_planted_then_written_through_stays_inside(tmp_path: Path, victim: Path, target: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    t = target.format(victim=victim)
    unpack_layer(layer(sym("escape", t)), root)
    # Next layer writes through the link: resolved inside the root.
    unpack_layer(layer(f("escape/target")), root)
    assert untouched(victim)
    found = [p for p in root.rglob("target") if p.is_file() and not p.is_symlink()]
    assert found and all(root in p.parents for p in found)
    assert found[0].read_text() == "pwned\n"


def test_a_chain_of_links_and_a_loop(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    unpack_layer(layer(sym("a", "b"), sym("b", "c"), sym("c", str(victim))), root)
    unpack_layer(layer(f("a/target")), root)
    assert untouched(victim)
    unpack_layer(layer(sym("loop1", "loop2"), sym("loop2", "loop1")), root)
    with pytest.raises(UnsafeLayer, match="too many links"):
        unpack_layer(layer(f("loop1/x")), root)


def test_the_entry_itself_is_never_followed(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    unpack_layer(layer(sym("file", str(victim / "target"))), root)
    unpack_layer(layer(f("file", b"replaced\n")), root)  # replaces the link, not its target
    assert untouched(victim)
    assert (root / "file").read_text() == "replaced\n" and not (root / "file").is_symlink()


def test_hard_links_must_stay_inside(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for target in (str(victim / "target"), "../outside/target"):
        ti = tarfile.TarInfo("h")
        ti.type, ti.linkname = tarfile.LNKTYPE, target
        with pytest.raises(UnsafeLayer):
            unpack_layer(layer(ti), root)
    # Through a planted link: resolved inside, where there is no such file.
    unpack_layer(layer(sym("up", str(victim))), root)
    ti = tarfile.TarInfo("h2")
    ti.type, ti.linkname = tarfile.LNKTYPE, "up/target"
    with pytest.raises(UnsafeLayer, match="missing|no directory"):
        unpack_layer(layer(ti), root)
    assert untouched(victim)


def test_device_files_refuse_the_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti = tarfile.TarInfo("dev/sda")
        ti.type, ti.devmajor, ti.devminor = kind, 8, 0
        with pytest.raises(UnsafeLayer, match="device"):
            unpack_layer(layer(ti), root)


def test_whiteouts_cannot_name_dotdot_and_work_inside(tmp_path: Path, victim: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    unpack_layer(layer(d("etc"), f("etc/a"), f("etc/b"), d("opt"), f("opt/x")), root)
    for bad in ("etc/.wh...", "etc/.wh.."):
        with pytest.raises(UnsafeLayer):
            unpack_layer(layer(f(bad, b"")), root)
    unpack_layer(layer(f("etc/.wh.a", b"")), root)
    assert sorted(os.listdir(root / "etc")) == ["b"]
    unpack_layer(layer(f("opt/new"), f("opt/.wh..wh..opq", b"")), root)
    assert sorted(os.listdir(root / "opt")) == ["new"]   # lower layers' files gone, this layer's kept
    assert untouched(victim)


def test_setuid_bits_dropped_and_size_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    unpack_layer(layer(f("suid", b"x", mode=0o4755)), root)
    assert (root / "suid").stat().st_mode & 0o7777 == 0o755
    with pytest.raises(UnsafeLayer, match="more than"):
        unpack_layer(layer(f("big", b"x" * 5000)), root, UnpackLimits(bytes_max=4096))
    with pytest.raises(UnsafeLayer, match="not a valid tar"):
        unpack_layer(io.BytesIO(b"\x1f\x8b garbage" * 100), root)
