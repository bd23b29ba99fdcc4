"""The emulated phones' model files, stored once per content: hard links into a pool by sha256.

Every emulated phone keeps its own model store, so that what it downloads is what a phone would
download (and what the report counts). A fleet of hundreds of phones each holding a version or
two of a 5 MB model would fill gigabytes with copies of the same few files, so after a phone has
downloaded and verified a version, `share` replaces each of its files by a hard link to the
pool's copy of the same sha256 (or gives the pool its copy). This changes nothing a device
decides: a store only ever reads its files, writes new versions into staging folders and deletes
whole folders, never a file in place. `prune` drops pool files that no store links any more.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedkb_core.durable import atomic_link
from fedkb_core.manifest import ManifestError, load_manifest


def share(store_root: Path | str, pool: Path | str) -> None:
    """Link every file of the complete versions under `store_root` with the pool's copy."""
    pool = Path(pool)
    pool.mkdir(parents=True, exist_ok=True)
    for folder in Path(store_root).glob("v*"):
        try:
            manifest = load_manifest(folder)  # only a complete version folder has one
        except ManifestError:
            continue
        for name, entry in manifest.files.items():
            path, shared = folder / name, pool / entry.sha256
            try:
                os.link(path, shared)  # the pool's first copy of this content
                continue
            except FileExistsError:
                pass
            except OSError:  # a file this device does not hold, or a filesystem without links
                continue
            try:
                if not os.path.samefile(path, shared):
                    atomic_link(shared, path)
            except OSError:  # pruned meanwhile: the device keeps its own copy
                continue


def prune(pool: Path | str) -> int:
    """Remove pool files only the pool links (call while no device job runs); return how many."""
    removed = 0
    for path in Path(pool).glob("*") if Path(pool).is_dir() else []:
        if path.is_file() and path.stat().st_nlink == 1:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
