"""A Triton cache manager for parallel test runs: each xdist worker writes only its own cache
folder (backend.configure gives it one), but a kernel that any worker of the run has already
compiled is read from that worker's folder instead of being compiled again.

Triton writes every cache file through a temporary file and an atomic rename, and a kernel's group
file last, so a group file seen in a sibling folder names complete, never-rewritten files.
Enabled by backend.configure on the GPU through TRITON_CACHE_MANAGER (unless that is set already).
"""
import json
import os
from typing import Dict, Optional

from triton.runtime.cache import FileCacheManager

BASE_ENV = "KERNELFUZZ_TRITON_CACHE_BASE"


class SiblingCacheManager(FileCacheManager):
    """FileCacheManager that falls back to the other worker folders under the run's cache base."""

    def get_group(self, filename: str) -> Optional[Dict[str, str]]:
        own = super().get_group(filename)
        if own is not None:
            return own
        base = os.environ.get(BASE_ENV)
        mine = os.path.dirname(os.path.normpath(self.cache_dir or ""))
        # only the run's own worker caches (base/<worker>/<key>), never an override or dump folder
        if not base or os.path.dirname(mine) != os.path.normpath(base):
            return None
        for entry in sorted(os.listdir(base)):
            folder = os.path.join(base, entry)
            if os.path.normpath(folder) == mine:
                continue
            found = _complete_group(os.path.join(folder, self.key, f"__grp__{filename}"))
            if found is not None:
                return found
        return None


def _complete_group(path: str) -> Optional[Dict[str, str]]:
    """The group's child files if the group file exists and every child it names does."""
    try:
        with open(path) as f:
            children = json.load(f).get("child_paths")
    except (OSError, ValueError):
        return None
    if not isinstance(children, dict) or not all(os.path.exists(p) for p in children.values()):
        return None
    return dict(children)
