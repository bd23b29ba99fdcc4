"""The trainable TFLite model in LiteRT: named signatures, weights by manifest name.

The export writes `trainable.tflite` with the signatures `train`, `evaluate`, `get_weights` and
`set_weights` (docs/architecture.md), builtin ops only, so the plain `ai-edge-litert` runtime trains it with
no Flex delegate. This wrapper is the only place that touches the interpreter. The weight layout
(names, shapes, dtypes) comes from the version's manifest and is checked against the model's
own signatures when it loads — never hard-coded, unlike Flower's Android example, whose
`layersSizes` array breaks silently when the model changes.

Threads: `num_threads` is always set explicitly (LiteRT's default is implementation-defined),
and the default op resolver keeps the XNNPACK delegate on for the float kernels.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from datasets.windows import Windows
from edge_runtime.litert_interpreter import create_interpreter
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import TRAINABLE_FILE, Manifest, load_manifest

Weights = dict[str, np.ndarray]
_SIGNATURES = ("train", "evaluate", "get_weights", "set_weights")


class ModelLayoutError(FedkbError):
    """The TFLite file does not have the signatures or weights its manifest promises."""


class TrainableModel:
    """One LiteRT interpreter over a version's `trainable.tflite`.

    Args:
        model_dir: a verified version folder (manifest.json + trainable.tflite).
        num_threads: interpreter threads (set explicitly; 1–2 on a phone's little cores).
        manifest: the folder's manifest, if already loaded.

    Raises:
        FedkbError: the file is missing or not a TFLite model.
        ModelLayoutError: a signature is missing, or the weights differ from the manifest's.
    """

    def __init__(self, model_dir: Path | str, *, num_threads: int = 1, manifest: Manifest | None = None):
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(self.model_dir)
        path = self.model_dir / TRAINABLE_FILE
        if not path.is_file():
            raise FedkbError(f"{path}: trainable model not found")
        try:  # LiteRT raises ValueError for a corrupt flatbuffer (RuntimeError if it cannot allocate)
            self._interpreter = create_interpreter(path, num_threads=num_threads)
            available = self._interpreter.get_signature_list()
        except (ValueError, RuntimeError) as err:
            raise FedkbError(f"{path}: not a TFLite model ({err})") from None
        missing = [s for s in _SIGNATURES if s not in available]
        if missing:
            raise ModelLayoutError(f"{path}: lacks the signatures {missing} (has {sorted(available)})")
        self._runners = {name: self._interpreter.get_signature_runner(name) for name in _SIGNATURES}
        self._lock = threading.Lock()  # signature runners share one interpreter and are not reentrant
        self.specs = {s.name: s for s in self.manifest.weights}
        self.batch_size, self.seq_len = self.manifest.batch_size, self.manifest.seq_len
        self._check_layout()

    def _check_layout(self) -> None:
        inputs = self._runners["set_weights"].get_input_details()
        outputs = self._runners["get_weights"].get_output_details()
        for where, details in (("set_weights inputs", inputs), ("get_weights outputs", outputs)):
            if set(details) != set(self.specs):
                raise ModelLayoutError(f"{self.model_dir}: {where} {sorted(details)} differ from the manifest's "
                                       f"weights {sorted(self.specs)}")
            for name, detail in details.items():
                spec = self.specs[name]
                if tuple(int(d) for d in detail["shape"]) != spec.shape or np.dtype(detail["dtype"]) != np.dtype(spec.dtype):
                    raise ModelLayoutError(f"{self.model_dir}: weight {name!r} is {tuple(detail['shape'])} "
                                           f"{np.dtype(detail['dtype'])} in the model, {spec.shape} {spec.dtype} in "
                                           "the manifest")
        x = self._runners["train"].get_input_details()["x"]["shape"]
        if tuple(int(d) for d in x) != (self.batch_size, self.seq_len):
            raise ModelLayoutError(f"{self.model_dir}: train takes x{tuple(x)}, the manifest says "
                                   f"[{self.batch_size}, {self.seq_len}]")

    @property
    def version(self) -> int:
        return self.manifest.version

    def get_weights(self) -> Weights:
        """Copies of every weight, by manifest name."""
        with self._lock:
            out = self._runners["get_weights"]()
        return {name: np.array(out[name], dtype=np.float32, copy=True) for name in self.specs}

    def set_weights(self, weights: Weights) -> None:
        """Replace every weight.

        Raises:
            ModelLayoutError: a name is missing or extra, or a shape differs.
        """
        if set(weights) != set(self.specs):
            raise ModelLayoutError(f"weights {sorted(weights)} differ from the model's {sorted(self.specs)}")
        args = {}
        for name, spec in self.specs.items():
            value = np.ascontiguousarray(weights[name], dtype=np.float32)
            if value.shape != spec.shape:
                raise ModelLayoutError(f"weight {name!r} has shape {value.shape}, the model needs {spec.shape}")
            args[name] = value
        with self._lock:
            self._runners["set_weights"](**args)

    def train_step(self, batch: Windows, learning_rate: float) -> float:
        """One SGD step on a [B, T] batch; returns the batch's mean masked loss (before the step)."""
        self._check_batch(batch)
        with self._lock:
            out = self._runners["train"](x=batch.x, y=batch.y, mask=batch.mask, lr=np.float32(learning_rate))
        return float(out["loss"])

    def evaluate(self, batch: Windows) -> tuple[float, float]:
        """(sum of token losses, number of tokens) on a [B, T] batch, without changing weights."""
        self._check_batch(batch)
        with self._lock:
            out = self._runners["evaluate"](x=batch.x, y=batch.y, mask=batch.mask)
        return float(out["loss_sum"]), float(out["tokens"])

    def _check_batch(self, batch: Windows) -> None:
        if batch.x.shape != (self.batch_size, self.seq_len):
            raise ValueError(f"batch is {batch.x.shape}, the model trains on [{self.batch_size}, {self.seq_len}]")


class TrainableCache:
    """The trainable model of the version in use, loaded once and kept warm between jobs.

    Loading an interpreter costs far more than a training step of a small job, and every job of
    a round trains the same version. What a job starts from is the version's own weights, read
    once at load: a job leaves the interpreter holding its trained weights, so the next job must
    not take them from `get_weights`. Keyed by the trainable file's sha256 as the (verified)
    manifest lists it, not by folder: the devices of an emulated fleet each keep their own copy
    of a version, and a folder can hold a different version 2 after a server was reset. Not
    thread-safe: one job at a time, as the scheduler runs them.

    Args:
        num_threads: interpreter threads of every model it loads.
    """

    def __init__(self, *, num_threads: int = 1):
        self.num_threads = num_threads
        self._key: str | None = None
        self._loaded: tuple[TrainableModel, Weights] | None = None
        self.loads = 0  # interpreters created (observability, tests)

    def load(self, model_dir: Path | str) -> tuple[TrainableModel, Weights]:
        """(the model, the version's weights) for a verified version folder.

        Raises:
            FedkbError / ModelLayoutError: as `TrainableModel`.
        """
        manifest = load_manifest(Path(model_dir))
        entry = manifest.files.get(TRAINABLE_FILE)
        key = entry.sha256 if entry else f"unlisted:{Path(model_dir).resolve()}"
        if self._key != key or self._loaded is None:
            self._key, self._loaded = None, None  # a failed load leaves nothing stale behind
            model = TrainableModel(model_dir, num_threads=self.num_threads, manifest=manifest)
            self._loaded, self._key = (model, model.get_weights()), key
            self.loads += 1
        return self._loaded
