"""Rules about a job's outcome, as small pure functions the drivers call.

Kept apart from the drivers so that the planned core host (#13) can take
them as they are, and so that each rule is tested on its own:

- :func:`start_refusal`: a member never starts a job twice.  A job it
  started before (in this life, or in one that ended with ``kill -9``, where
  it proves the time served as ``interrupted``) is not started again when a
  repeated confirmation arrives; the submitter settles on that one proof.
- :func:`member_state_after`: the record state a member keeps when it
  refuses such a start (a previous life's ``running`` was interrupted).
"""

from __future__ import annotations

#: Member states after which a job is never started again on this node.
STARTED_STATES = ("running", "succeeded", "failed", "interrupted")


def start_refusal(member_state: str | None) -> str | None:
    """``None`` if this node may start the job, else why not."""
    if member_state in STARTED_STATES:
        return f"already started on this node (its part is {member_state}): a job never runs twice"
    return None


def member_state_after(member_state: str) -> str:
    """The record state to keep when a start is refused (``running`` was a
    previous life's: that life was interrupted)."""
    return "interrupted" if member_state == "running" else member_state
