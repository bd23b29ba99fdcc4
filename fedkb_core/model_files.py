"""The publish side of the rewrite contract: new weights into a version's .tflite files.

The exporter (`export/rewrite.py`, TensorFlow) converts once and stores in the manifest, under
`extra[MANIFEST_KEY][file name]`, where each weight lives in each flatbuffer. Everything after
that is numpy + flatbuffers, here, so the server publishes without importing TensorFlow:

    rewrite_model_file(src, dst, weights, manifest=parent, kind="trainable.tflite", derived=DERIVED)
    read_weights(model_dir, manifest, derived=DERIVED)

`derived` is the model's folding rules (`model/derived.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkb_core import tflite_rewrite as tr

REWRITABLE_FILES = ("trainable.tflite", "inference.tflite")
MANIFEST_KEY = "tflite_rewrite"  # manifest.extra[MANIFEST_KEY][file name] = RewriteMap JSON


def rewrite_map(manifest, kind: str) -> tr.RewriteMap:
    try:
        return tr.RewriteMap.from_json(manifest.extra[MANIFEST_KEY][kind])
    except KeyError:
        raise ValueError(f"manifest has no rewrite map for {kind}; re-export the model") from None


def rewrite_model_file(src: Path, dst: Path, weights: dict[str, np.ndarray], *, manifest, kind: str,
                       derived: dict[str, tr.Derived]) -> None:
    data = tr.rewrite(Path(src).read_bytes(), rewrite_map(manifest, kind), weights, derived=derived)
    Path(dst).write_bytes(data)  # into the caller's staging folder, which fsyncs and renames it


def read_weights(model_dir: Path, manifest, *, derived: dict[str, tr.Derived]) -> dict[str, np.ndarray]:
    """The weights held by trainable.tflite's variable initializers (exact float32)."""
    kind = "trainable.tflite"
    return tr.read_weights((Path(model_dir) / kind).read_bytes(), rewrite_map(manifest, kind), derived=derived)
