"""Where a cache lives: a local folder or an fsspec URL (``s3://bucket/prefix``, ``gs://``, ...).

Zarr reads and writes both through one string; the few file-level operations kdcache needs besides
(does it exist, read one ``zarr.json``, remove, size, flush to disk) are here, so nothing else in the
cache package touches a path. Credentials and endpoints come from the usual places: for S3, the AWS
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...),
``~/.aws``, or fsspec's own configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec

from ..errors import KdcacheError


def is_url(path: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def location(path: str | Path) -> str:
    """The canonical string of a cache location: URLs as given (without a trailing slash), local
    paths as paths. (``Path("s3://b/c")`` would collapse the scheme's slashes; hence strings.)"""
    return str(path).rstrip("/") if is_url(path) else str(Path(path))


def join(path: str | Path, *parts: str) -> str:
    return "/".join([location(path), *parts])


def _fs(path: str) -> tuple[Any, str]:
    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs installed
        raise KdcacheError(f"cannot open {path}: {exc}") from exc
    if is_url(path):
        fs.invalidate_cache()  # listings are cached per instance; another process may have written since
    return fs, root


def exists(path: str | Path) -> bool:
    fs, root = _fs(location(path))
    return bool(fs.exists(root))


def nonempty_dir(path: str | Path) -> bool:
    """True when ``path`` holds anything (an object prefix with objects under it, or a non-empty folder)."""
    fs, root = _fs(location(path))
    if not fs.exists(root):
        return False
    return bool(fs.ls(root, detail=False)) if fs.isdir(root) else True


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON document at ``path``, or None when it is missing or unreadable."""
    fs, root = _fs(location(path))
    try:
        return json.loads(fs.cat_file(root))
    except (OSError, ValueError):
        return None


def remove(path: str | Path) -> None:
    fs, root = _fs(location(path))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def size(path: str | Path) -> int:
    """Bytes of every file (object) under ``path``."""
    fs, root = _fs(location(path))
    return int(fs.du(root, total=True))


def flush(path: str | Path) -> None:
    """Make everything under a local ``path`` durable (fsync every file and folder), so a block marked
    complete survives a power loss and not only a killed process. Object stores are durable once a
    write returns: nothing to do there."""
    if is_url(path):
        return
    for root, _, files in os.walk(location(path)):
        for name in [*files, None]:
            fd = os.open(os.path.join(root, name) if name else root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
