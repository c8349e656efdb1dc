"""A member's input by hash is asked for again while no source serves it (#13).

A member fetches an input by hash from the job's submitter (and the other
members).  A submitter killed and restarting just after it submitted (its
pins survive a crash precisely so that members can still fetch) was
unreachable for a few seconds, and the member failed the job at once:
"input data.bin: blob ...: none of 1 peers has it" (one run in seven of
``tests/content/test_input_pins.py``).  Now the fetch is tried again after
each pause of ``core._fetch.sources_retry_ms`` (31 s in all) while no source
answers; a provider that lied about the blob is not asked again.

One layer: ``stage_inputs`` with a real content store and a stand-in for
the blob service (the real one is tested against real peers in
``tests/content``), on trio's mock clock (the pauses are virtual).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pgpu.content import BlobStore
from p2pgpu.core import Identity
from p2pgpu.core._fetch import sources_retry_ms
from p2pgpu.node._blobs import FetchError, NoSourceError
from p2pgpu.node._inputs import InputError, stage_inputs

DATA = b"input bytes\n" * 1000
SHA = hashlib.sha256(DATA).hexdigest()
ME, SUBMITTER = Identity(b"\x01" * 32), Identity(b"\x02" * 32)


class Blobs:
    """Serves nothing for ``unreachable`` attempts, then the blob (or raises ``error`` always)."""

    def __init__(self, store: BlobStore, source: Path, *, unreachable: int, error: type[Exception] = NoSourceError):
        self.store, self.source, self.unreachable, self.error = store, source, unreachable, error
        self.attempts: list[float] = []

    async def fetch(self, sha256: str, size: int, *, root: Any, sources: list[str], progress: Any) -> None:
        self.attempts.append(trio.current_time())
        assert sources == [SUBMITTER.peer_id]
        if len(self.attempts) <= self.unreachable:
            raise self.error(f"blob {sha256[:12]}: none of 1 peers has it")
        self.store.import_file(self.source, 0, sha256=sha256)


def staged(tmp_path: Path, blobs_for: Any) -> tuple[Blobs, list[str], Path, BaseException | None]:
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    store = BlobStore(tmp_path / "store")
    blobs = blobs_for(store, src)
    node = SimpleNamespace(blobs=blobs, identity=ME, now_ms=lambda: 0)
    inp = SimpleNamespace(name="data.bin", data=None, sha256=SHA, size_bytes=len(DATA), url="", cid="", tree="",
                          providers=())
    start = SimpleNamespace(job_id="j" * 64, certificate=SimpleNamespace(members=(ME.peer_id,)),
                            manifest=SimpleNamespace(manifest=SimpleNamespace(inputs=[inp],
                                                                              submitter=SUBMITTER.peer_id)))
    inputs = tmp_path / "in"
    inputs.mkdir()
    said: list[str] = []
    error: list[BaseException] = []

    async def say(text: str) -> None:
        said.append(text)

    async def main() -> None:
        try:
            await stage_inputs(node, start, inputs, say)  # type: ignore[arg-type]
        except InputError as exc:
            error.append(exc)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return blobs, said, inputs, error[0] if error else None


def test_an_input_whose_source_is_restarting_is_fetched_when_it_is_back(tmp_path: Path) -> None:
    blobs, said, inputs, error = staged(tmp_path, lambda st, src: Blobs(st, src, unreachable=3))
    assert error is None, error
    assert (inputs / "data.bin").read_bytes() == DATA
    assert len(blobs.attempts) == 4
    # Asked again after 1, 2 and 4 s, and the member's log says so.
    assert [round(b - a) for a, b in zip(blobs.attempts, blobs.attempts[1:])] == [1, 2, 4]
    assert sum("trying again in 1 s" in line for line in said) == 1


def test_a_source_that_never_comes_back_fails_the_input_after_the_last_pause(tmp_path: Path) -> None:
    blobs, _said, _inputs, error = staged(tmp_path, lambda st, src: Blobs(st, src, unreachable=100))
    assert isinstance(error, InputError) and "none of 1 peers has it" in str(error)
    assert len(blobs.attempts) == len(sources_retry_ms) + 1
    assert blobs.attempts[-1] - blobs.attempts[0] == pytest.approx(sum(sources_retry_ms) / 1000)


def test_a_bad_provider_is_not_asked_again(tmp_path: Path) -> None:
    blobs, _said, _inputs, error = staged(tmp_path, lambda st, src: Blobs(st, src, unreachable=100,
                                                                          error=FetchError))
    assert isinstance(error, InputError)
    assert len(blobs.attempts) == 1
