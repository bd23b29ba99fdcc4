"""Model versions on the device: download, verify, swap atomically, keep one for rollback.

Layout under `root`:
    v<N>/              complete, verified versions (at most the current and the previous one)
    .v<N>.*.tmp/       a download in progress (removed at start-up: a crash leaves only this)
    state.json         {"current": N, "previous": M}, replaced atomically

A new version is staged in a temporary folder (`fedkb_core.durable.atomic_folder`), every file is
checked against the manifest's size and sha256 (`fedkb_core.manifest.verify_files`), the folder is
renamed to `v<N>` and only then does `state.json` switch to it, with one atomic replace. A crash at any point leaves the old version
serving; a file that fails its checksum is deleted with its staging folder and the old version
stays current. Listeners (the suggester) are told after a swap, so the trainable and the
inference model of one version always change together.

A manifest is input from the network, so it is checked before anything is read or written:
its signature against the device's pinned keys (`fedkb_core.signing`; `manifest.sig` is kept
in the version folder), its file names (each one plain file name: no path separator, not
absolute, not empty, not `.` or `..`, or `staging / name` could land anywhere on the device), the
files the device needs, and the sizes it lists against the device's own limits
(`bounds.DownloadLimits`: per file, per version, and the free storage that must remain). Each
download is cut off as soon as it exceeds the size the manifest lists, so a server (or a proxy)
sending an endless body cannot fill the disk. A verified version becomes current only if its
parts agree with each other (`version_check`): the interpreters load, and tokenizer, manifest
and models have one vocabulary.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from edge_runtime.bounds import DownloadLimits
from edge_runtime.client import DownloadTooLarge
from edge_runtime.version_check import InconsistentVersion, check_complete, check_consistent
from fedkb_core.errors import FedkbError
from fedkb_core.durable import atomic_folder, atomic_write_json, remove_temps
from fedkb_core.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest, verify_files
from fedkb_core.signing import SIGNATURE_FILE, SignatureError, TrustedKeys

log = logging.getLogger(__name__)

_STATE = "state.json"


class ModelRejected(FedkbError):
    """A downloaded version that failed verification; the previous version stays current."""


class ModelStore:
    """The device's model versions.

    Args:
        root: the folder that holds them (created if missing).
        limits: the device's byte budgets for a version.
        trusted_keys: the model signing keys manifests must be signed with; None accepts unsigned
            versions (only for callers that got the folder from a trusted place, like tests).
    """

    def __init__(self, root: Path | str, *, limits: DownloadLimits = DownloadLimits(),
                 trusted_keys: TrustedKeys | None = None):
        self.root = Path(root)
        self.limits, self.trusted_keys = limits, trusted_keys
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Path, Manifest], None]] = []
        remove_temps(self.root)  # a download (or a state.json write) a crash interrupted

    # State ----------------------------------------------------------------------------------
    def _state(self) -> dict:
        try:
            state = json.loads((self.root / _STATE).read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self, current: int | None, previous: int | None) -> None:
        atomic_write_json(self.root / _STATE, {"current": current, "previous": previous}, indent=None)

    @property
    def current_version(self) -> int | None:
        return self._state().get("current")

    @property
    def previous_version(self) -> int | None:
        return self._state().get("previous")

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version}"

    def has_version(self, version: int) -> bool:
        return (self.version_dir(version) / MANIFEST_FILE).is_file()

    def current_dir(self) -> Path | None:
        version = self.current_version
        return self.version_dir(version) if version is not None else None

    def add_listener(self, listener: Callable[[Path, Manifest], None]) -> None:
        """Call `listener(version_dir, manifest)` after every swap."""
        self._listeners.append(listener)

    # Installing ------------------------------------------------------------------------------
    def install_local(self, source: Path | str, *, activate: bool = True) -> Manifest:
        """Copy a verified local version folder in (first install, tests).

        Raises:
            ModelRejected: the folder's files do not match its manifest, or (with trusted keys)
                its manifest.sig is missing or wrong.
        """
        source = Path(source)
        manifest = _verified_manifest(source)
        raw, signature = (source / MANIFEST_FILE).read_bytes(), None
        if (source / SIGNATURE_FILE).is_file():
            signature = (source / SIGNATURE_FILE).read_bytes()
        self._check_signature(manifest, raw, signature)

        def fill(staging: Path) -> None:
            for name in manifest.files:
                shutil.copyfile(source / name, staging / name)

        return self._install(manifest, raw, fill, activate=activate, signature=signature)

    def fetch(self, client, version: int | None = None, *, activate: bool = True) -> Manifest:
        """Download `version` (default: the latest) from the server, verify it, and swap to it.

        Raises:
            ModelRejected: the manifest is garbled, unsigned or wrongly signed, lists what the
                device will not download, or a file's size or sha256 differs from it.
            ServerError / ServerUnavailable: from the client.
        """
        manifest, raw = _remote_manifest(client, version)
        if version is not None and manifest.version != version:
            raise ModelRejected(f"asked for version {version}, the server sent version {manifest.version}")
        signature = client.manifest_signature(manifest.version) if self.trusted_keys is not None else None
        self._check_signature(manifest, raw, signature)
        if self.has_version(manifest.version):
            if activate and manifest.version != self.current_version:
                self.activate(manifest.version)
            return load_manifest(self.version_dir(manifest.version))

        self._check_room(manifest)

        def fill(staging: Path) -> None:
            for name, entry in manifest.files.items():
                try:
                    client.download(manifest.version, name, staging / name, max_bytes=entry.bytes)
                except DownloadTooLarge as err:
                    raise self._rejected(manifest, err) from None

        return self._install(manifest, raw, fill, activate=activate, signature=signature)

    def _rejected(self, manifest: Manifest, why) -> ModelRejected:
        return ModelRejected(f"version {manifest.version} rejected, keeping version {self.current_version}: {why}")

    def _check_signature(self, manifest: Manifest, raw: bytes, signature: bytes | None) -> None:
        if self.trusted_keys is None:
            return
        try:
            self.trusted_keys.verify(raw, signature, where=f"manifest of version {manifest.version}")
        except SignatureError as err:
            raise self._rejected(manifest, err) from None

    def _check_room(self, manifest: Manifest) -> None:
        """Refuse, before any byte is written, a version larger than the device's limits allow or
        than its free storage holds."""
        limits = self.limits
        try:
            check_complete(manifest)
        except InconsistentVersion as err:
            raise self._rejected(manifest, err) from None
        if len(manifest.files) > limits.max_files:
            raise self._rejected(manifest, f"it lists {len(manifest.files)} files, more than the {limits.max_files} "
                                           "this device accepts")
        for name, entry in manifest.files.items():
            if not 0 <= entry.bytes <= limits.max_file_bytes:
                raise self._rejected(manifest, f"{name} is listed at {entry.bytes} bytes; this device downloads "
                                               f"files of at most {limits.max_file_bytes}")
        total = sum(entry.bytes for entry in manifest.files.values())
        if total > limits.max_version_bytes:
            raise self._rejected(manifest, f"its files add up to {total} bytes, more than the "
                                           f"{limits.max_version_bytes} this device keeps for a version")
        free = shutil.disk_usage(self.root).free
        if free - total < limits.min_free_bytes:
            raise self._rejected(manifest, f"not enough free storage: {total} bytes needed, {free} free, and "
                                           f"{limits.min_free_bytes} must stay free")

    def update_if_newer(self, client) -> Manifest | None:
        """Check-in time: fetch and swap to the server's latest version if it is newer."""
        latest, _ = _remote_manifest(client)
        current = self.current_version
        if current is not None and latest.version <= current:
            return None
        return self.fetch(client, latest.version)

    def _install(self, manifest: Manifest, manifest_bytes: bytes, fill: Callable[[Path], None], *,
                 activate: bool, signature: bytes | None = None) -> Manifest:
        # replace: a folder already at v<N> is a leftover state.json does not list.
        with atomic_folder(self.version_dir(manifest.version), replace=True, lock=self._lock) as staging:
            fill(staging)
            if signature is not None:
                (staging / SIGNATURE_FILE).write_bytes(signature)
            (staging / MANIFEST_FILE).write_bytes(manifest_bytes)  # last: a folder with a manifest is complete
            try:
                verify_files(staging, load_manifest(staging))
                check_consistent(staging, manifest)  # before it can become current
            except (ManifestError, InconsistentVersion) as err:
                raise self._rejected(manifest, err) from None
        log.info("model version %d downloaded and verified", manifest.version)
        if activate:
            self.activate(manifest.version)
        return manifest

    # Swapping --------------------------------------------------------------------------------
    def activate(self, version: int) -> None:
        """Make `version` current (the old current becomes the rollback version)."""
        with self._lock:
            if not self.has_version(version):
                raise FedkbError(f"model version {version} is not on this device")
            current = self.current_version
            if current == version:
                return
            self._write_state(version, current)
            self._prune()
            manifest = load_manifest(self.version_dir(version))
        log.info("model version %d is now current (rollback: %s)", version, current)
        for listener in self._listeners:
            listener(self.version_dir(version), manifest)

    def rollback(self) -> int:
        """Go back to the previous version; returns it.

        Raises:
            FedkbError: there is no previous version.
        """
        with self._lock:
            previous = self.previous_version
            if previous is None or not self.has_version(previous):
                raise FedkbError("no previous model version to roll back to")
            self.activate(previous)
            return previous

    def _prune(self) -> None:
        keep = {f"v{v}" for v in (self.current_version, self.previous_version) if v is not None}
        for folder in self.root.glob("v*"):
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)


def _remote_manifest(client, version: int | None = None) -> tuple[Manifest, bytes]:
    """The server's manifest. One garbled in transit is a rejected download like a bad file
    (the device keeps its version and tries again later), not an error that stops the device."""
    try:
        manifest, raw = client.manifest(version)
    except ManifestError as err:
        raise ModelRejected(f"manifest rejected: {err}") from None
    _check_file_names(manifest)
    return manifest, raw


def _verified_manifest(folder: Path) -> Manifest:
    try:
        manifest = load_manifest(folder)
        _check_file_names(manifest)  # before verify_files reads `folder / name`
        verify_files(folder, manifest)
    except ManifestError as err:
        raise ModelRejected(str(err)) from None
    return manifest


def _check_file_names(manifest: Manifest) -> None:
    """Every listed file must be one plain name inside the version folder.

    Raises:
        ModelRejected: a name that is empty, `.`/`..`, absolute, or holds a path separator or NUL.
    """
    for name in manifest.files:
        if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
            raise ModelRejected(f"version {manifest.version} rejected: the manifest lists the file name {name!r}, "
                                "which is not a plain file name")
