"""Atomic file replacement: every file ossnet writes appears whole or not at all.

Writers write to a hidden temporary file in the target's folder (same file system, so the final
`os.replace` is atomic) and only a finished file replaces the target. A crash or Ctrl-C at any moment
leaves the previous version (or nothing), never a half-written mask, checkpoint or table.

A process killed with SIGKILL cannot remove its temporary file. Its name records the host and process
that wrote it, so the next write into the same folder removes the temporary files of processes of this
host that no longer run (and, from other hosts sharing the folder, those untouched for ABANDONED_AFTER_S).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ossnet.errors import OssnetError

PREFIX = ".ossnet-tmp"
# Temporary files of another host (shared file systems) untouched this long have no live writer.
ABANDONED_AFTER_S = 3600
_TEMPORARY = re.compile(rf"^{re.escape(PREFIX)}\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]+\.")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffixes, so writers pick the same format); on success
    it replaces `path`, on failure it is removed. Stale temporary files in the folder are swept first.

    An OSError of the writer or of the rename (read-only folder, disk full, file-size limit, a folder in
    the way) becomes an OssnetError naming `path`."""
    path = Path(path)
    temporary = path.with_name(f"{PREFIX}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise OssnetError(f"{path}: cannot write ({error.strerror or error})") from error
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is unwritable: nothing was created


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


@contextlib.contextmanager
def scratch_folder(parent: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder in `parent` for temporary files (e.g. a decompressed scan), removed afterwards;
    named as the temporary files are, so that a later write into `parent` sweeps it when its process was
    killed."""
    folder = Path(parent) / f"{PREFIX}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.scratch"
    try:
        folder.mkdir()
    except OSError as error:
        raise OssnetError(f"{parent}: cannot make a scratch folder ({error.strerror or error})") from error
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_stale(folder: Path) -> list[Path]:
    """Delete the temporary files (and scratch folders) in `folder` whose writer is gone; returns what was
    deleted."""
    removed = []
    try:
        candidates = [entry for entry in folder.iterdir() if entry.name.startswith(PREFIX)]
    except OSError:
        return removed
    host, cutoff = _host(), time.time() - ABANDONED_AFTER_S
    for entry in candidates:
        match = _TEMPORARY.match(entry.name)
        if match is None:
            continue
        try:
            gone = (not _alive(int(match["pid"])) if match["host"] == host
                    else entry.stat().st_mtime < cutoff)
            if gone:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
        except OSError:
            pass  # removed meanwhile, or not ours to remove
    return removed


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
