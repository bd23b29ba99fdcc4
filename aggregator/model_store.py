"""The model store: one folder per published version under `<state>/models/<version>/`.

A version folder holds the files its manifest lists (trainable.tflite, inference.tflite,
tokenizer.model, manifest.json) plus two server-side files the manifest does not list and the
server never serves: `weights.safetensors` (the global float32 weights, so aggregation never needs
an interpreter) and `optimizer.safetensors` (the server momentum buffer, when momentum is on).
Keeping the optimizer state inside the version folder makes "new weights + new momentum + new
files" one unit that appears atomically with the folder's rename.

Every version folder also holds `manifest.sig`, the Ed25519 signature of its manifest.json
(`fedkb_core.signing`), made with the state folder's `signing_key.pem` (created on first use,
0600; `public_key.pem` beside it is what the app pins). A version published before signing
existed is signed the first time its signature is asked for.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from fedkb_core.durable import atomic_folder, atomic_write, remove_temps
from fedkb_core.manifest import Manifest, ManifestError, load_manifest, verify_files
from fedkb_core.model_files import read_weights
from fedkb_core.signing import SIGNATURE_FILE, ManifestSigner, load_or_create_signing_key, sign_folder
from fedkb_core.wire import WeightSpec
from model.derived import DERIVED

WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"

Tensors = dict[str, np.ndarray]


def save_tensors(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata))


class ModelStore:
    """Read access to published versions, with manifests and weights cached (versions never change).

    Args:
        root: `<state>/models`.
        key_dir: the folder of `signing_key.pem` (default: the state folder, `root`'s parent).
    """

    def __init__(self, root: Path, *, key_dir: Path | None = None):
        self.root = Path(root)
        self.key_dir = Path(key_dir) if key_dir is not None else self.root.parent
        self._lock = threading.Lock()
        self._manifests: dict[int, Manifest] = {}
        self._signer: ManifestSigner | None = None

    @property
    def signer(self) -> ManifestSigner:
        """The state folder's manifest signer (its key created on first use)."""
        with self._lock:
            if self._signer is None:
                self._signer = load_or_create_signing_key(self.key_dir)
            return self._signer

    def sign(self, folder: Path) -> None:
        """Sign the manifest.json in `folder` (a version being published)."""
        sign_folder(folder, self.signer)

    def signature_bytes(self, version: int) -> bytes:
        """The version's `manifest.sig`, signing it now if it predates signing.

        Ed25519 signatures are deterministic, so two processes doing this at once write the
        same bytes."""
        path = self.version_dir(version) / SIGNATURE_FILE
        if not path.is_file():
            self.sign(self.version_dir(version))
        return path.read_bytes()

    def version_dir(self, version: int) -> Path:
        return self.root / str(int(version))

    def has_version(self, version: int) -> bool:
        return (self.version_dir(version) / "manifest.json").is_file()

    def manifest(self, version: int) -> Manifest:
        """The manifest of a published version.

        Raises:
            ManifestError: the version folder is missing or its manifest is unreadable.
        """
        with self._lock:
            cached = self._manifests.get(version)
        if cached is None:
            cached = load_manifest(self.version_dir(version))
            with self._lock:
                self._manifests[version] = cached
        return cached

    def manifest_bytes(self, version: int) -> bytes:
        return (self.version_dir(version) / "manifest.json").read_bytes()

    def specs(self, version: int) -> list[WeightSpec]:
        return list(self.manifest(version).weights)

    def weights(self, version: int) -> Tensors:
        return load_file(self.version_dir(version) / WEIGHTS_FILE)

    def velocity(self, version: int) -> Tensors | None:
        path = self.version_dir(version) / OPTIMIZER_FILE
        return load_file(path) if path.is_file() else None

    def remove_partial(self) -> None:
        """Delete half-written version folders left by a crash during publishing."""
        remove_temps(self.root)

    def import_initial(self, model_dir: Path) -> Manifest:
        """Copy an exported model folder in as the first version, with its weights extracted.

        The weights come from `weights.safetensors` beside the manifest when the exporter wrote
        one, else they are read out of trainable.tflite (see `fedkb_core.model_files`).

        Raises:
            ManifestError: the folder is not a valid export (missing files, wrong sha256, weights
                that do not match the manifest's layout).
        """
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir)
        verify_files(model_dir, manifest)
        weights_path = model_dir / WEIGHTS_FILE
        if weights_path.is_file():
            weights = load_file(weights_path)
        else:
            weights = read_weights(model_dir, manifest, derived=DERIVED)
        _check_layout(weights, manifest, where=str(model_dir))

        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_folder(self.version_dir(manifest.version)) as staging:
            for name in [*manifest.files, "manifest.json"]:
                shutil.copyfile(model_dir / name, staging / name)
            save_tensors(staging / WEIGHTS_FILE, {k: np.asarray(v, np.float32) for k, v in weights.items()})
            self.sign(staging)
        return manifest


def _check_layout(weights: Tensors, manifest: Manifest, *, where: str) -> None:
    want = {w.name: w.shape for w in manifest.weights}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if want != got:
        raise ManifestError(f"{where}: weights {json.dumps({k: list(v) for k, v in got.items()})} do not match "
                            f"the manifest's layout {json.dumps({k: list(v) for k, v in want.items()})}")
