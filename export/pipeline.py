"""`fedkb export`: weights + tokenizer → a complete, verifiable model version folder.

A version folder holds `trainable.tflite` (trains on the device), `inference.tflite`
(suggestions), `tokenizer.model` and `manifest.json` (written last, so a folder with a manifest
is complete), plus `weights.safetensors`, the same weights for the server, which devices never
download and the manifest does not list.
"""

from __future__ import annotations

import datetime
import logging
import shutil
from pathlib import Path

from export.convert import convert_module
from export.inference import InferenceLM
from export.rewrite import MANIFEST_KEY as REWRITE_KEY
from export.rewrite import convert_rewritable
from export.trainable import TrainableLM
from fedkb_core import manifest as mf
from fedkb_core.durable import atomic_file, atomic_write
from fedkb_core.errors import FedkbError
from model.config import ModelConfig
from model.weights import Weights, check_weights, initial_weights, save_weights, weight_specs

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"


def signature_table(config: ModelConfig) -> dict:
    """The signatures as the manifest documents them (names and static shapes)."""
    B, T, H, V = config.batch_size, config.seq_len, config.lstm_units, config.vocab_size
    batch = {"x": ["int32", [B, T]], "y": ["int32", [B, T]], "mask": ["float32", [B, T]]}
    return {
        "trainable.tflite": {
            "train": {"inputs": {**batch, "lr": ["float32", []]}, "outputs": ["loss"]},
            "evaluate": {"inputs": batch, "outputs": ["loss_sum", "tokens", "correct"]},
            "infer": {"inputs": {"x": ["int32", [B, T]]}, "outputs": ["logits"]},
            "get_weights": {"inputs": {}, "outputs": [s.name for s in weight_specs(config)]},
            "set_weights": {"inputs": {s.name: ["float32", list(s.shape)] for s in weight_specs(config)}, "outputs": ["ok"]},
        },
        "inference.tflite": {
            "step": {"inputs": {"token": ["int32", [1]], "h": ["float32", [1, H]], "c": ["float32", [1, H]]},
                     "outputs": {"logits": [1, V], "h": [1, H], "c": [1, H]}},
        },
    }


def export_model(*, tokenizer_path: Path, out_dir: Path, config: ModelConfig, weights: Weights | None = None,
                 version: int = 1, parent_version: int | None = None, quantize: bool = True) -> mf.Manifest:
    """Convert and write one model version; return its manifest.

    Raises:
        FedkbError: weights that do not fit the config, a tokenizer of another vocabulary size,
            an unwritable output folder, or a conversion that needs non-builtin ops.
    """
    from datasets.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_piece_size() != config.vocab_size:
        raise FedkbError(f"{tokenizer_path}: vocabulary of {tokenizer.get_piece_size()}, the model has {config.vocab_size}")
    weights = check_weights(weights, config) if weights is not None else initial_weights(config)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedkbError(f"{out_dir}: cannot create the output folder ({err.strerror})") from None
    stale = out_dir / mf.MANIFEST_FILE
    if stale.exists():
        stale.unlink()  # the folder is incomplete until the new manifest lands

    # Convert each graph once with sentinel weights and map where every weight landed in the
    # flatbuffer, so later versions are published by rewriting those bytes (export.rewrite),
    # in milliseconds and without TensorFlow, instead of converting again.
    def convert_trainable(w):
        module = TrainableLM(config, w)
        return convert_module(module, module.signatures(), resource_variables=True)

    def convert_inference(w):
        module = InferenceLM(config, w)
        return convert_module(module, {"step": module.step.get_concrete_function()}, quantize=quantize)

    rewrite_maps = {}
    for name, convert in ((mf.TRAINABLE_FILE, convert_trainable), (mf.INFERENCE_FILE, convert_inference)):
        try:
            data, rewrite_maps[name] = convert_rewritable(convert, weights)
        except ValueError as err:  # the converter folded or merged a weight beyond recognition
            raise FedkbError(f"{name}: weights cannot be mapped for rewriting ({err})") from err
        atomic_write(out_dir / name, data)
    if Path(tokenizer_path).resolve() != (out_dir / mf.TOKENIZER_FILE).resolve():
        with open(tokenizer_path, "rb") as src, atomic_file(out_dir / mf.TOKENIZER_FILE) as dst:
            shutil.copyfileobj(src, dst)
    save_weights(out_dir / WEIGHTS_FILE, weights, metadata={"version": str(version)})

    # weights.safetensors sits beside the manifest for the server (it aggregates in numpy) but is
    # not part of what devices download, so it is not listed.
    files = {}
    for name in (mf.TRAINABLE_FILE, mf.INFERENCE_FILE, mf.TOKENIZER_FILE):
        path = out_dir / name
        files[name] = mf.FileEntry(sha256=mf.sha256_file(path), bytes=path.stat().st_size)
    manifest = mf.Manifest(
        version=version,
        parent_version=parent_version,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        files=files,
        tokenizer_sha256=files[mf.TOKENIZER_FILE].sha256,
        vocab_size=config.vocab_size,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        weights=weight_specs(config),
        model_config=config.to_json(),
        signatures=signature_table(config),
        extra={"inference_quantization": "dynamic_range_int8" if quantize else "none",
               "num_parameters": config.num_parameters,
               REWRITE_KEY: rewrite_maps},
    )
    mf.write_manifest(out_dir, manifest)
    log.info("exported version %d to %s", version, out_dir)
    return manifest
