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

A version costs a device only what it needs and does not hold (Bonawitz et al., 2019, count the
model download as part of every round's cost):
* the files its work needs, not all the manifest lists (`fetch(files=...)`: a device that only
  trains never fetches the inference model; one that is not selected never fetches the trainable
  one). A version folder holds its verified manifest and a verified subset of its files; a file
  added later is verified (sha256 and consistency, in a staging folder) before it is linked in
  under its name, so no file a reader can see was ever unverified;
* no file whose sha256 it already holds in another version (the tokenizer, usually): it is
  hard-linked from there, and hashed again before it counts, like a download;
* nothing at all for a version it holds with those files (its signature is checked again,
  locally, against the keys trusted now);
* the manifest only when it changed: the one it holds is asked for with `If-None-Match`, and a
  304 (checked by the client) means the held bytes, whose signature is checked again;
* no byte twice when a transfer breaks off: the client asks for the rest (`Range`, `If-Range`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from edge_runtime.bounds import DownloadLimits
from edge_runtime.client import BadReply, DownloadTooLarge
from edge_runtime.version_check import InconsistentVersion, check_complete, check_consistent
from fedkb_core.errors import FedkbError
from fedkb_core.durable import (atomic_folder, atomic_link, atomic_write_json, fsync_dir, fsync_file, remove_temps,
                                temp_path)
from fedkb_core.manifest import (MANIFEST_FILE, TOKENIZER_FILE, Manifest, ManifestError, load_manifest, sha256_bytes,
                                 verify_files)
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
        for folder in self.root.glob("v*"):
            remove_temps(folder)  # a file a crash interrupted while it was being linked in

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
        """Whether the device holds `version` (its verified manifest and some of its files)."""
        return (self.version_dir(version) / MANIFEST_FILE).is_file()

    def holds(self, version: int, files: Iterable[str] | None = None) -> bool:
        """Whether the device holds `version` with `files` (default: all it lists)."""
        if not self.has_version(version):
            return False
        folder = self.version_dir(version)
        names = load_manifest(folder).files if files is None else files
        return all((folder / name).is_file() for name in names)

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

    def fetch(self, client, version: int | None = None, *, activate: bool = True,
              files: Iterable[str] | None = None) -> Manifest:
        """Get `version` (default: the latest) with `files` (default: all it lists; the tokenizer
        always), verify what is new, and swap to it; what it already holds costs no download.

        Raises:
            ModelRejected: the manifest is garbled, unsigned or wrongly signed, lists what the
                device will not download, differs from the one held for that version, or a
                file's size or sha256 differs from it; a 304 that answers no question asked.
            ServerError / ServerUnavailable: from the client.
        """
        files = None if files is None else tuple(dict.fromkeys((*files, TOKENIZER_FILE)))
        if version is not None and self.holds(version, files):
            manifest, raw, signature = self._held(version)  # no request at all
            self._check_signature(manifest, raw, signature)
        else:
            manifest, raw, signature = self._manifest(client, version)
        return self._complete(client, manifest, raw, signature, files, activate=activate)

    def update_if_newer(self, client, files: Iterable[str] | None = None) -> Manifest | None:
        """Check-in time: fetch `files` of the server's latest version and swap to it if it is
        newer. The current manifest is asked for conditionally: an unchanged one costs a 304."""
        found = self._manifest(client, None, only_newer=True)
        if found is None:
            return None
        return self._complete(client, *found, None if files is None else tuple(dict.fromkeys((*files, TOKENIZER_FILE))),
                              activate=True)

    def _held(self, version: int) -> tuple[Manifest, bytes, bytes | None]:
        """The manifest of a held version, its bytes and its signature (None if it has none)."""
        folder = self.version_dir(version)
        sig = folder / SIGNATURE_FILE
        return load_manifest(folder), (folder / MANIFEST_FILE).read_bytes(), sig.read_bytes() if sig.is_file() else None

    def _manifest(self, client, version: int | None, *,
                  only_newer: bool = False) -> tuple[Manifest, bytes, bytes | None] | None:
        """The server's manifest of `version` (None: the latest) and its signature, checked; asked
        for conditionally when the device holds that version (for the latest: the current one).
        `only_newer`: None unless it is newer than the current version (then no signature is fetched)."""
        current = self.current_version
        known = current if version is None else version
        held = self._held(known) if known is not None and self.has_version(known) else None
        try:
            answer = client.manifest(version, held=(sha256_bytes(held[1]), len(held[1])) if held else None)
        except ManifestError as err:
            raise ModelRejected(f"manifest rejected, keeping version {current}: {err}") from None
        if answer is None:  # 304 for exactly the bytes held
            if only_newer:
                return None
            manifest, raw, signature = held  # those, their signature checked again below
        else:
            manifest, raw = answer
            _check_file_names(manifest)
            if version is not None and manifest.version != version:
                raise ModelRejected(f"asked for version {version}, the server sent version {manifest.version}")
            if only_newer and current is not None and manifest.version <= current:
                return None
            signature = client.manifest_signature(manifest.version) if self.trusted_keys is not None else None
        self._check_signature(manifest, raw, signature)
        return manifest, raw, signature

    def _complete(self, client, manifest: Manifest, raw: bytes, signature: bytes | None, files: tuple[str, ...] | None,
                  *, activate: bool) -> Manifest:
        """Make the device hold `manifest`'s version with `files` (None: all), then activate it."""
        folder = self.version_dir(manifest.version)
        held = self.has_version(manifest.version)
        if held and (folder / MANIFEST_FILE).read_bytes() != raw:
            raise self._rejected(manifest, f"it differs from the version {manifest.version} this device already "
                                           "holds (was the server's state reset?)")
        wanted = tuple(manifest.files) if files is None else files
        missing = [name for name in wanted if not (held and (folder / name).is_file())]
        if missing:
            self._check_room(manifest, missing)
            self._install(manifest, raw, self._filler(client, manifest, wanted, missing), wanted,
                          signature=signature, add_to=folder if held else None)
        if activate and manifest.version != self.current_version:
            self.activate(manifest.version)
        return manifest

    def _filler(self, client, manifest: Manifest, wanted: tuple[str, ...], missing: list[str]) -> Callable[[Path], None]:
        """What fills a staging folder with `wanted`: links to the files held, downloads of the rest."""
        def fill(staging: Path) -> None:
            for name in wanted:
                entry = manifest.files.get(name)
                if entry is None:
                    raise self._rejected(manifest, f"the manifest lists no {name}")
                source = self._held_file(entry.sha256, entry.bytes)
                if source is not None and _link(source, staging / name):
                    continue
                if name not in missing:  # held a moment ago, gone now: the store changed under us
                    raise self._rejected(manifest, f"{name} of version {manifest.version} vanished while in use")
                try:
                    client.download(manifest.version, name, staging / name, max_bytes=entry.bytes,
                                    sha256=entry.sha256)
                except (DownloadTooLarge, BadReply) as err:
                    raise self._rejected(manifest, err) from None
        return fill

    def _held_file(self, sha256: str, size: int) -> Path | None:
        """A verified file of that content in any version the device holds."""
        for folder in sorted(self.root.glob("v*")):
            try:
                held = load_manifest(folder)
            except ManifestError:
                continue
            for name, entry in held.files.items():
                if entry.sha256 == sha256 and entry.bytes == size and (folder / name).is_file():
                    return folder / name
        return None

    def _rejected(self, manifest: Manifest, why) -> ModelRejected:
        return ModelRejected(f"version {manifest.version} rejected, keeping version {self.current_version}: {why}")

    def _check_signature(self, manifest: Manifest, raw: bytes, signature: bytes | None) -> None:
        if self.trusted_keys is None:
            return
        try:
            self.trusted_keys.verify(raw, signature, where=f"manifest of version {manifest.version}")
        except SignatureError as err:
            raise self._rejected(manifest, err) from None

    def _check_room(self, manifest: Manifest, downloads: list[str] | None = None) -> None:
        """Refuse, before any byte is written, a version larger than the device's limits allow or
        than its free storage holds (`downloads`: the files it is about to fetch; default all)."""
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
        needed = sum(manifest.files[name].bytes for name in (manifest.files if downloads is None else downloads)
                     if name in manifest.files)
        free = shutil.disk_usage(self.root).free
        if free - needed < limits.min_free_bytes:
            raise self._rejected(manifest, f"not enough free storage: {needed} bytes needed, {free} free, and "
                                           f"{limits.min_free_bytes} must stay free")

    def _install(self, manifest: Manifest, manifest_bytes: bytes, fill: Callable[[Path], None],
                 names: Iterable[str] | None = None, *, activate: bool = False, signature: bytes | None = None,
                 add_to: Path | None = None) -> Manifest:
        """Stage `names` (default: all listed) with `fill`, verify them and the version's consistency,
        then make the staging folder the version (or, `add_to`, link its new files into the held one)."""
        names = tuple(manifest.files) if names is None else tuple(names)

        def stage_and_check(staging: Path) -> None:
            fill(staging)
            if signature is not None:
                (staging / SIGNATURE_FILE).write_bytes(signature)
            (staging / MANIFEST_FILE).write_bytes(manifest_bytes)  # last: a folder with a manifest is complete
            try:
                verify_files(staging, load_manifest(staging), names)
                check_consistent(staging, manifest)  # before it can become current
            except (ManifestError, InconsistentVersion) as err:
                raise self._rejected(manifest, err) from None

        if add_to is None:
            # replace: a folder already at v<N> is a leftover state.json does not list.
            with atomic_folder(self.version_dir(manifest.version), replace=True, lock=self._lock) as staging:
                stage_and_check(staging)
        else:
            staging = temp_path(self.version_dir(manifest.version))  # removed at start if a crash leaves it
            staging.mkdir()
            try:
                stage_and_check(staging)
                with self._lock:
                    for name in names:
                        if not (add_to / name).exists():
                            fsync_file(staging / name)
                            atomic_link(staging / name, add_to / name)  # a verified, durable file appears
                    fsync_dir(add_to)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        log.info("model version %d: %s downloaded and verified", manifest.version, ", ".join(names))
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


def _link(source: Path, dest: Path) -> bool:
    """Hard-link a held file into a staging folder (a copy where links do not work); False when
    the source is gone."""
    try:
        os.link(source, dest)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            shutil.copyfile(source, dest)
        except FileNotFoundError:
            return False
    return True


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
