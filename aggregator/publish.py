"""Publishing a new model version: new weights → new files → manifest → one atomic rename.

Only the weights change between versions, so no converter runs: the trainable and inference
TFLite files of the parent version are copied with their weight buffers rewritten in place
(`fedkb_core.model_files`), the tokenizer is linked, the manifest is written last with fresh sha256s
and signed (`manifest.sig`, `fedkb_core.signing`), and the finished folder is renamed from a
temporary name to `models/<v>` (`fedkb_core.durable.atomic_folder`). A device never sees a
half-written version: before the rename the version does not exist, after it every file is there.
This runs in the background worker, never in a request.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np

from fedkb_core.durable import atomic_folder
from aggregator.model_store import OPTIMIZER_FILE, WEIGHTS_FILE, ModelStore, save_tensors
from fedkb_core.manifest import FileEntry, Manifest, sha256_file, write_manifest
from fedkb_core.model_files import REWRITABLE_FILES, rewrite_model_file
from model.derived import DERIVED

Tensors = dict[str, np.ndarray]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def publish_version(store: ModelStore, *, parent: int, version: int, weights: Tensors,
                    velocity: Tensors | None = None, extra: dict | None = None) -> Manifest:
    """Write version `version` = the parent's files with `weights`, and publish it atomically.

    Args:
        store: the model store holding the parent version.
        parent: version whose files (graph, tokenizer) the new one reuses.
        version: the new version number; its folder must not exist yet.
        weights: the new global weights, float32, by weight name (the manifest's layout).
        velocity: the server momentum buffer to keep beside them, if any.
        extra: merged into the manifest's `extra` (for example the round id).

    Returns:
        The new version's manifest.

    Raises:
        FileExistsError: the version is already published.
        ValueError: the weights do not match the parent's layout.
    """
    parent_dir = store.version_dir(parent)
    parent_manifest = store.manifest(parent)
    want = {w.name: w.shape for w in parent_manifest.weights}
    got = {k: tuple(np.shape(v)) for k, v in weights.items()}
    if want != got:
        raise ValueError(f"new weights {got} do not match version {parent}'s layout {want}")
    final = store.version_dir(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists")

    store.root.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as tmp:
        # Files: rewrite the models' weight buffers, link everything else (it does not change).
        entries = {}
        for name in parent_manifest.files:
            if name in REWRITABLE_FILES:
                rewrite_model_file(parent_dir / name, tmp / name, weights, manifest=parent_manifest, kind=name,
                                   derived=DERIVED)
            else:
                _link_or_copy(parent_dir / name, tmp / name)
            entries[name] = FileEntry(sha256=sha256_file(tmp / name), bytes=(tmp / name).stat().st_size)
        save_tensors(tmp / WEIGHTS_FILE, {k: np.asarray(v, np.float32) for k, v in weights.items()})
        if velocity is not None:
            save_tensors(tmp / OPTIMIZER_FILE, velocity)

        # The manifest last, then the rename that publishes the folder.
        manifest = dataclasses.replace(
            parent_manifest, version=version, parent_version=parent, files=entries,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            extra={**parent_manifest.extra, **(extra or {})})
        write_manifest(tmp, manifest)
        store.sign(tmp)  # manifest.sig: what devices verify before they read anything else
    return manifest
