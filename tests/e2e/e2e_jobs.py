"""Manifests the end-to-end tests share (a module, not a test file: the
tests import it by name, as pytest puts this directory on ``sys.path``)."""

from __future__ import annotations


def sleep_job(name: str, *, nodes: int, sleep_s: int, on_member_loss: str = "fail") -> str:
    """A job that prints ``started``, sleeps, prints ``done``: long enough to
    kill or cancel something while it runs."""
    return f"""
name = "{name}"
[requirements]
nodes = {nodes}
gpus_per_node = 1
[runtime]
command = ["sh", "-c", "echo started; sleep {sleep_s}; echo done"]
duration_s_max = 60
[payment]
price_per_gpu_hour_max = 36000000
[verification]
on_member_loss = "{on_member_loss}"
"""
