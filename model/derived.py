"""Constants the TFLite converter folds out of several of this model's weights.

Publishing rewrites weights inside the flatbuffers (`fedkb_core.tflite_rewrite`); a tensor that
holds a value computed from several weights can only be rewritten if the rule that computes it is
known. Those rules follow from how `model/keras_model.py` and `export/` write the graph, so they
live here, beside the model, and numpy-only: the server imports this without TensorFlow.
"""

from __future__ import annotations

from fedkb_core.tflite_rewrite import Derived

DERIVED: dict[str, Derived] = {
    # logits = (h @ P + pb) @ E^T + ob: TFL's optimizer moves pb through the tied output
    # matmul into its bias (FuseAddAndFullyConnected), giving one bias ob + E @ pb.
    "output_bias+embedding@projection_bias": Derived(
        ("output_bias", "embedding", "projection_bias"), lambda ob, e, pb: ob + e @ pb),
}
