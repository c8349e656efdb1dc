"""Local files as job inputs: ``{ path = "..." }`` in a manifest, or ``inputs=``.

The SDK resolves each path (relative to the manifest file's directory, else
the current one), hashes the file with progress, and sends the daemon the
absolute path with its sha256; the daemon copies it into its content store,
checks the hash, and names it in the signed manifest by ``sha256``,
``size_bytes`` and chunk-tree root, then serves it to the job's members.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._errors import BadManifest

#: ``progress(name, done_bytes, total_bytes)``: called as a local input is hashed.
InputProgress = Callable[[str, int, int], None]
_READ_BYTES = 1 << 20


def hash_file(path: Path, name: str, progress: InputProgress | None = None) -> tuple[str, int]:
    """sha256 (hex) and size of a local file, reporting progress."""
    h, done = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            while chunk := f.read(_READ_BYTES):
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(name, done, total)
    except OSError as exc:
        raise BadManifest(f"inputs.{name}.path: cannot read {path}: {exc.strerror or exc}",
                          field=f"inputs.{name}.path") from None
    if progress is not None and done == 0:
        progress(name, 0, 0)
    return h.hexdigest(), done


def with_local_inputs(param: str | dict[str, Any], inputs: Mapping[str, str | os.PathLike[str]] | None,
                      base_dir: Path | None, progress: InputProgress | None) -> tuple[str | dict[str, Any], int]:
    """The manifest parameter with every local file resolved and hashed, and
    the total bytes of those files (``param`` as it was when there are none)."""
    if isinstance(param, str):
        if not inputs and "path" not in param:
            return param, 0
        from p2pgpu.core._manifest import ManifestError, toml_doc  # noqa: PLC0415

        try:
            doc: dict[str, Any] = toml_doc(param)
        except ManifestError:
            return param, 0  # the daemon names the error
    else:
        doc = dict(param)
    table = doc.get("inputs", {})
    if not isinstance(table, dict):
        return doc, 0
    table = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    for name, path in (inputs or {}).items():
        if name in table:
            raise BadManifest(f"inputs.{name}: given both in the manifest and as --input", field=f"inputs.{name}")
        table[name] = {"path": os.fspath(path)}
    base = base_dir or Path.cwd()
    total = 0
    for name, spec in sorted(table.items()):
        if not isinstance(spec, dict) or "path" not in spec or not isinstance(spec["path"], str):
            continue
        p = Path(spec["path"]).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if not p.is_file():
            raise BadManifest(f"inputs.{name}.path: {p} is not a file", field=f"inputs.{name}.path")
        sha, size = hash_file(p, name, progress)
        spec["path"], spec["sha256"] = str(p), sha
        total += size
    doc["inputs"] = table
    return doc, total
