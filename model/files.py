"""Folders the project writes to (results, caches), checked before any work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from model.errors import ConfigError


def writable_problem(path: str | Path) -> str | None:
    """Why files cannot be created under folder `path` (which need not exist yet), or None.
    Checked by creating (and removing) a folder in the nearest existing one: permission
    bits, read-only mounts and full disks all show, for root too."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".faerec-write-check-", dir=existing))
    except OSError as e:
        return f"cannot create anything in {existing} ({e.strerror})"
    return None


def check_writable(path: str | Path, field: str) -> None:
    """One ConfigError naming the setting and its value when `path` is not writable."""
    problem = writable_problem(path)
    if problem:
        raise ConfigError(f"{field} = {path}: not a writable folder: {problem}")

