"""Where caches live and how their files are written (datasets, embeddings, PCA tables)."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from model.config import PROJECT_ROOT


def cache_root(setting: str | Path | None = None) -> Path:
    """The setting, else $FAEREC_CACHE, else <project>/.cache."""
    return Path(setting or os.environ.get("FAEREC_CACHE") or PROJECT_ROOT / ".cache")


def atomic_write(path: Path, write: Callable) -> None:
    """`write(binary file)` to a temporary file, then rename: a concurrent reader sees the
    whole file or none of it, and a crash leaves no partial file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
