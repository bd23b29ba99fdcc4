"""tf.Module → TFLite flatbuffer, with TFLite's builtin ops only."""

from __future__ import annotations

import logging
import tempfile
import time

import tensorflow as tf

from fedkb_core.errors import FedkbError

log = logging.getLogger(__name__)


def convert_module(module: tf.Module, signatures: dict, *, quantize: bool = False,
                   resource_variables: bool = False) -> bytes:
    """Convert through a SavedModel so that every named signature survives.

    Only TFLITE_BUILTINS are allowed: the device runtime has no Flex delegate, so a model
    that needed one would fail on the phone rather than here.

    Raises:
        FedkbError: the graph needs an op outside TFLite's builtins.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedkb-savedmodel-") as saved:
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = resource_variables
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # the converter raises ConverterError with MLIR text
            raise FedkbError(f"TFLite conversion with builtin ops only failed: {str(err).splitlines()[0]}") from err
    log.info("converted %s (%s) in %.1f s, %d bytes", type(module).__name__, ", ".join(signatures),
             time.monotonic() - started, len(flatbuffer))
    return flatbuffer
