"""Model weights as a dict of named numpy arrays: the layout every part agrees on.

The names below are the keys of `get_weights`/`set_weights` in the TFLite model, of the
safetensors files and updates on the wire, and of the manifest's weight list. Shapes follow
Keras's LSTM layout (gate order i, f, c, o), so Keras weights map one to one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from fedkb_core.durable import atomic_write
from fedkb_core.errors import FedkbError
from fedkb_core.wire import WeightSpec
from model.config import ModelConfig

WEIGHT_NAMES = (
    "embedding",  # [V, E]; also the (transposed) output layer: tied
    "lstm_kernel",  # [E, 4H]
    "lstm_recurrent_kernel",  # [H, 4H]
    "lstm_bias",  # [4H]
    "projection_kernel",  # [H, E]
    "projection_bias",  # [E]
    "output_bias",  # [V]
)

Weights = dict[str, np.ndarray]


def weight_specs(config: ModelConfig) -> tuple[WeightSpec, ...]:
    v, e, h = config.vocab_size, config.embed_dim, config.lstm_units
    shapes = {
        "embedding": (v, e),
        "lstm_kernel": (e, 4 * h),
        "lstm_recurrent_kernel": (h, 4 * h),
        "lstm_bias": (4 * h,),
        "projection_kernel": (h, e),
        "projection_bias": (e,),
        "output_bias": (v,),
    }
    return tuple(WeightSpec(name, shapes[name], "float32") for name in WEIGHT_NAMES)


def initial_weights(config: ModelConfig) -> Weights:
    """Seeded initial weights (uniform kernels, zero biases, forget-gate bias 1 as Keras does)."""
    rng = np.random.default_rng(config.seed)
    weights = {}
    for spec in weight_specs(config):
        if spec.name.endswith("bias"):
            weights[spec.name] = np.zeros(spec.shape, np.float32)
        else:
            weights[spec.name] = rng.uniform(-config.init_scale, config.init_scale, spec.shape).astype(np.float32)
    h = config.lstm_units
    weights["lstm_bias"][h : 2 * h] = 1.0  # unit_forget_bias: remember by default at the start
    return weights


def check_weights(weights: Weights, config: ModelConfig, *, where: str = "weights") -> Weights:
    """Raise FedkbError unless `weights` has exactly the config's names, shapes, finite values."""
    specs = {s.name: s for s in weight_specs(config)}
    if set(weights) != set(specs):
        raise FedkbError(f"{where}: weight names {sorted(weights)} differ from the model's {sorted(specs)}")
    for name, spec in specs.items():
        if tuple(weights[name].shape) != spec.shape:
            raise FedkbError(f"{where}: {name} has shape {tuple(weights[name].shape)}, the model needs {spec.shape}")
        if not np.all(np.isfinite(weights[name])):
            raise FedkbError(f"{where}: {name} contains NaN or infinity")
    return {name: np.ascontiguousarray(weights[name], dtype=np.float32) for name in WEIGHT_NAMES}


def save_weights(path: Path | str, weights: Weights, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata=metadata))


def load_weights(path: Path | str, config: ModelConfig | None = None) -> Weights:
    path = Path(path)
    if not path.is_file():
        raise FedkbError(f"{path}: weights file not found")
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own types for corrupt files
        raise FedkbError(f"{path}: not a safetensors weights file ({err})") from None
    return check_weights(weights, config, where=str(path)) if config else weights
