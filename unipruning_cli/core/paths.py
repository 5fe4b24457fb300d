"""Where unipruning keeps things on disk: the cache root (prepared assets, converted models, cached results).

This module imports nothing of the package, so every other module can ask for a path without an
import circle.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$UNIPRUNING_CACHE``, else ``$XDG_CACHE_HOME/unipruning``, else ``~/.cache/unipruning``.

    Holds the offline assets (``unipruning prepare``), converted models, and the caches of dense
    results, dense calibration statistics and the search index. Not created here.
    """
    env = os.environ.get("UNIPRUNING_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unipruning"


def nearest_existing(path: Path) -> Path:
    """``path`` (absolute) or its nearest existing ancestor: where a file or folder to be made there would be made,
    whose file system and permissions decide whether it can be."""
    path = Path(path).expanduser().absolute()
    return next(p for p in (path, *path.parents) if p.exists())
