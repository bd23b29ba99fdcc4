"""Is a downloaded model version whole and self-consistent? Asked before it may become current.

Matching sha256s prove only that the files are the ones the manifest lists. A manifest can list
no files at all, or a tokenizer of 16,000 pieces beside models with 8,000 embedding rows, with
every checksum right: such a version would install, then fail on the first training step or
keystroke ("gather index out of bounds"). So before a version may be activated the device
checks what it will rely on: every file it needs is listed, the tokenizer's size is the
manifest's vocabulary is the models' embedding rows and output width, and the interpreters it
holds load with the signatures and weight layout the manifest promises. A device holds only the
files its work needs (`TRAINING_FILES` to train, `SUGGESTION_FILES` to suggest), and each is
checked when it arrives. A version that fails stays out, and the current one keeps serving.
"""

from __future__ import annotations

from pathlib import Path

from datasets.tokenizer import load_tokenizer
from edge_runtime.litert_model import TrainableModel
from edge_runtime.suggest import InferenceStepper
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import INFERENCE_FILE, TOKENIZER_FILE, TRAINABLE_FILE, Manifest

REQUIRED_FILES = (TRAINABLE_FILE, INFERENCE_FILE, TOKENIZER_FILE)  # what a version must list
TRAINING_FILES = (TRAINABLE_FILE, TOKENIZER_FILE)  # what a device needs to train
SUGGESTION_FILES = (INFERENCE_FILE, TOKENIZER_FILE)  # ... and to suggest
VOCABULARY_WEIGHTS = ("embedding", "output_bias")  # weights whose first dimension is the vocabulary


class InconsistentVersion(FedkbError):
    """A version that is incomplete or whose parts disagree; it must not become current."""


def check_complete(manifest: Manifest) -> None:
    """Every file the device needs is listed (before anything is downloaded).

    Raises:
        InconsistentVersion: a required file is not in the manifest.
    """
    missing = [name for name in REQUIRED_FILES if name not in manifest.files]
    if missing:
        raise InconsistentVersion(f"the manifest lists no {', '.join(missing)}")


def check_consistent(folder: Path, manifest: Manifest) -> None:
    """The files in `folder` (already sha256-verified; the tokenizer and the models it holds)
    agree with each other and the manifest.

    Raises:
        InconsistentVersion: naming the first disagreement.
    """
    check_complete(manifest)
    vocab = manifest.vocab_size
    stepper = None
    try:
        pieces = load_tokenizer(folder / TOKENIZER_FILE).get_piece_size()
        if (folder / TRAINABLE_FILE).is_file():
            TrainableModel(folder, manifest=manifest)  # signatures, weight names, shapes and [B, T]
        if (folder / INFERENCE_FILE).is_file():
            stepper = InferenceStepper(folder / INFERENCE_FILE)
    except FedkbError as err:
        raise InconsistentVersion(str(err)) from None
    if pieces != vocab:
        raise InconsistentVersion(f"the tokenizer has {pieces} pieces, the manifest's vocabulary is {vocab}")
    shapes = {w.name: w.shape for w in manifest.weights}
    if "embedding" not in shapes:
        raise InconsistentVersion(f"the manifest lists no embedding weight")
    for name in VOCABULARY_WEIGHTS:
        if name in shapes and (not shapes[name] or shapes[name][0] != vocab):
            raise InconsistentVersion(f"weight {name!r} has shape {list(shapes[name])}, "
                                      f"but the vocabulary is {vocab}")
    if stepper is not None and stepper.logits_size != vocab:
        raise InconsistentVersion(f"the inference model scores {stepper.logits_size} pieces, "
                                  f"the vocabulary is {vocab}")
