"""manifest.json: what a published model version contains, read and checked without TensorFlow.

`fedkb export` writes it; the aggregator serves it and the edge runtime verifies every file it
downloads against it before swapping models. The weight layout (names, shapes, dtypes) is read
from here by both sides and never hard-coded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from fedkb_core.errors import FedkbError
from fedkb_core.durable import atomic_write_json, sha256_file
from fedkb_core.wire import WeightSpec

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
TRAINABLE_FILE = "trainable.tflite"
INFERENCE_FILE = "inference.tflite"
TOKENIZER_FILE = "tokenizer.model"


class ManifestError(FedkbError):
    """A manifest that is missing, malformed, or does not match the files beside it."""


@dataclasses.dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One model version: its files, shapes, weight layout and lineage."""

    version: int
    parent_version: int | None
    created: str  # ISO 8601, UTC
    files: dict[str, FileEntry]
    tokenizer_sha256: str
    vocab_size: int
    batch_size: int  # B of the trainable model's static [B, T] signatures
    seq_len: int  # T
    weights: tuple[WeightSpec, ...]
    model_config: dict = dataclasses.field(default_factory=dict)
    signatures: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        body = dataclasses.asdict(self)
        body["weights"] = [{"name": w.name, "shape": list(w.shape), "dtype": w.dtype} for w in self.weights]
        return body

    @classmethod
    def from_json(cls, body: dict, *, where: str = MANIFEST_FILE) -> "Manifest":
        """Parse and type-check a manifest body.

        Raises:
            ManifestError: a missing field or a value of the wrong type, naming both.
        """
        try:
            if body.get("format_version") != FORMAT_VERSION:
                raise ManifestError(f"{where}: format_version {body.get('format_version')!r}, expected {FORMAT_VERSION}")
            files = {name: FileEntry(sha256=str(e["sha256"]), bytes=int(e["bytes"])) for name, e in body["files"].items()}
            weights = tuple(WeightSpec(str(w["name"]), tuple(int(d) for d in w["shape"]), str(w["dtype"]))
                            for w in body["weights"])
            manifest = cls(
                version=int(body["version"]),
                parent_version=None if body.get("parent_version") is None else int(body["parent_version"]),
                created=str(body["created"]),
                files=files,
                tokenizer_sha256=str(body["tokenizer_sha256"]),
                vocab_size=int(body["vocab_size"]),
                batch_size=int(body["batch_size"]),
                seq_len=int(body["seq_len"]),
                weights=weights,
                model_config=dict(body.get("model_config") or {}),
                signatures=dict(body.get("signatures") or {}),
                extra=dict(body.get("extra") or {}),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:  # OverflowError: int(1e400)
            raise ManifestError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
        if not weights:
            raise ManifestError(f"{where}: lists no weights")
        return manifest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest(model_dir: Path | str) -> Manifest:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: missing (is {model_dir} a folder written by `fedkb export`?)")
    try:
        body = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return Manifest.from_json(body, where=str(path))


def write_manifest(model_dir: Path | str, manifest: Manifest) -> Path:
    """Write manifest.json atomically (it is the last file of a version to appear)."""
    return atomic_write_json(Path(model_dir) / MANIFEST_FILE, manifest.to_json())


def verify_files(model_dir: Path | str, manifest: Manifest, names=None) -> None:
    """Check every listed file (or the listed `names` only: a device holds what it needs) exists
    with the listed size and sha256.

    Raises:
        ManifestError: naming the first file that is missing or differs, or a name not listed.
    """
    root = Path(model_dir)
    for name in manifest.files if names is None else names:
        if name not in manifest.files:
            raise ManifestError(f"{root}: {name} is not listed in the manifest")
        entry, path = manifest.files[name], root / name
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ManifestError(f"{path}: {size} bytes, manifest says {entry.bytes}")
        if sha256_file(path) != entry.sha256:
            raise ManifestError(f"{path}: sha256 differs from the manifest")
    if TOKENIZER_FILE in manifest.files and manifest.files[TOKENIZER_FILE].sha256 != manifest.tokenizer_sha256:
        raise ManifestError(f"{root}: tokenizer_sha256 disagrees with the tokenizer file entry")
