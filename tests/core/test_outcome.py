"""The outcome rules (``core/_outcome.py``): tables in, verdicts out."""

from __future__ import annotations

import pytest

from p2pgpu.core._outcome import member_state_after, start_refusal


@pytest.mark.parametrize("member_state,refused", [
    (None, False), ("", False), ("running", True), ("succeeded", True), ("failed", True), ("interrupted", True),
])
def test_a_job_never_starts_twice(member_state: str | None, refused: bool) -> None:
    assert (start_refusal(member_state) is not None) == refused


def test_a_previous_lifes_run_was_interrupted() -> None:
    assert member_state_after("running") == "interrupted"
    assert member_state_after("succeeded") == "succeeded"
