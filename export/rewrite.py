"""Publishing a new version without the converter: the two sides of the rewrite contract.

Export side (imports TensorFlow through the caller's `convert` function, runs once per graph):
    data, rmap_json = convert_rewritable(convert, weights, sentinel_seed)
    manifest.extra[MANIFEST_KEY][file_name] = rmap_json

The publish side (numpy + flatbuffers only) is `fedkb_core.model_files`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedkb_core import tflite_rewrite as tr

from fedkb_core.model_files import MANIFEST_KEY, REWRITABLE_FILES  # noqa: F401  (re-exported for export/)
from model.derived import DERIVED


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
    rmap = tr.map_weights(data, sentinels, derived=DERIVED)
    return tr.rewrite(data, rmap, weights, derived=DERIVED), rmap.to_json()
