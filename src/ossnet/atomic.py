"""Atomic file replacement: every file ossnet writes appears whole or not at all.

Writers write to a hidden temporary file in the target's folder (same file system, so the final
`os.replace` is atomic) and only a finished file replaces the target. A crash or Ctrl-C at any moment
leaves the previous version (or nothing), never a half-written mask, checkpoint or table.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffixes, so writers pick the same format); on success
    it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{uuid.uuid4().hex}.tmp.{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
