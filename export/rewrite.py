"""Publishing a new version without the converter: the two sides of the rewrite contract.

Export side (imports TensorFlow through the caller's `convert` function, runs once per graph):
    data, rmap_json = convert_rewritable(convert, weights, sentinel_seed)
    manifest.extra["tflite_rewrite"][file_name] = rmap_json

Publish side (numpy + flatbuffers only; fits `aggregator/publish.py`'s call):
    rewrite_model_file(src, dst, weights, manifest=parent_manifest, kind="trainable.tflite")
    read_weights(model_dir, manifest)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from export import tflite_rewrite as tr

REWRITABLE_FILES = ("trainable.tflite", "inference.tflite")
MANIFEST_KEY = "tflite_rewrite"  # manifest.extra[MANIFEST_KEY][file name] = RewriteMap JSON


def sentinel_weights(weights: dict[str, np.ndarray], seed: int = 0x5EED) -> dict[str, np.ndarray]:
    """Distinct random values with the weights' shapes and roughly their scale."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(weights):
        w = np.asarray(weights[name], np.float32)
        scale = float(np.abs(w).mean()) or 0.05
        out[name] = (rng.standard_normal(w.shape) * scale).astype(np.float32)
    return out


def convert_rewritable(convert: Callable[[dict[str, np.ndarray]], bytes], weights: dict[str, np.ndarray],
                       seed: int = 0x5EED) -> tuple[bytes, dict]:
    """Convert once with sentinel weights, map them, and rewrite the result to `weights`.

    The returned bytes compute with `weights` (for the trainable model they are byte-identical to
    converting `weights` directly), and every later version is made by `tr.rewrite` with the map.
    """
    sentinels = sentinel_weights(weights, seed)
    data = convert(sentinels)
    rmap = tr.map_weights(data, sentinels)
    return tr.rewrite(data, rmap, weights), rmap.to_json()


def _rmap(manifest, kind: str) -> tr.RewriteMap:
    try:
        return tr.RewriteMap.from_json(manifest.extra[MANIFEST_KEY][kind])
    except KeyError:
        raise ValueError(f"manifest has no rewrite map for {kind}; re-export the model") from None


def rewrite_model_file(src: Path, dst: Path, weights: dict[str, np.ndarray], *, manifest, kind: str) -> None:
    data = tr.rewrite(Path(src).read_bytes(), _rmap(manifest, kind), weights)
    with open(dst, "wb") as f:
        f.write(data)


def read_weights(model_dir: Path, manifest) -> dict[str, np.ndarray]:
    """The weights held by trainable.tflite's variable initializers (exact float32)."""
    kind = "trainable.tflite"
    return tr.read_weights((Path(model_dir) / kind).read_bytes(), _rmap(manifest, kind))
