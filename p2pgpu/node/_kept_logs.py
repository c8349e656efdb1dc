"""Log lines kept in memory for ``job logs``, bounded by jobs and by bytes.

The submitter keeps the lines its members send (``_collect.py``: the store
has them too, so what goes is read back), and a member its own lines
(``_runner.py``: what goes is gone, as after a restart).  Both kept the last
64 jobs' lines with no bound on their size: up to 50,000 lines of 4 KiB per
job on the submitter, 10,000 on a member, gigabytes at worst (#13).
:class:`KeptLogs` holds at most ``jobs_max`` jobs and ``bytes_max`` bytes of
lines in all; to make room it drops the least recently written jobs first,
and a job that would fill it alone keeps the lines that fit.  Pure: no I/O,
no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

#: What one kept line costs beyond its text (the dict, its keys, the ints).
line_overhead_bytes = 200


def line_bytes(entry: dict[str, Any]) -> int:
    return len(str(entry.get("line", ""))) + line_overhead_bytes


class KeptLogs:
    def __init__(self, *, jobs_max: int, bytes_max: int) -> None:
        if jobs_max < 1 or bytes_max < 1:
            raise ValueError("jobs_max and bytes_max are at least 1")
        self.jobs_max, self.bytes_max = jobs_max, bytes_max
        self._lines: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self.bytes = 0
        #: Lines not kept because the job alone filled the bytes.
        self.dropped_lines = 0

    def __len__(self) -> int:
        return len(self._lines)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._lines

    def get(self, job_id: str, default: Any = None) -> Any:
        return self._lines.get(job_id, default)

    def add(self, job_id: str, entries: list[dict[str, Any]]) -> int:
        """Keep ``entries`` after the job's lines; returns how many were kept."""
        lines = self._lines.get(job_id)
        if lines is None:
            lines = self._lines[job_id] = []
            self._bytes[job_id] = 0
        self._lines.move_to_end(job_id)
        while len(self._lines) > self.jobs_max:
            self._drop(next(iter(self._lines)))
        kept = 0
        for entry in entries:
            size = line_bytes(entry)
            while self.bytes + size > self.bytes_max and next(iter(self._lines)) != job_id:
                self._drop(next(iter(self._lines)))
            if self.bytes + size > self.bytes_max:
                self.dropped_lines += len(entries) - kept
                break
            lines.append(entry)
            self._bytes[job_id] += size
            self.bytes += size
            kept += 1
        return kept

    def _drop(self, job_id: str) -> None:
        del self._lines[job_id]
        self.bytes -= self._bytes.pop(job_id)
