"""Model versions on the device: install, download with sha256 checks, atomic swap, rollback.

Downloads go over real HTTP from a real aggregator (in-process Werkzeug server on loopback),
through `FaultProxy` when a test needs a file corrupted in transit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from edge_runtime.client import RetryPolicy, ServerClient, ServerError
from edge_runtime.model_store import ModelRejected, ModelStore
from edge_runtime.suggester import LiveSuggester
from fedkb_core.durable import leftover_temps, temp_path
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import (INFERENCE_FILE, MANIFEST_FILE, TOKENIZER_FILE, TRAINABLE_FILE, FileEntry,
                            load_manifest, sha256_file, verify_files, write_manifest)
from tests.fixtures_aggregator import ServerThread, server_overrides, wait_for
from tests.fixtures_edge import FaultProxy, Typist, bump_version, edge_model, proxy, retrained  # noqa: F401


@pytest.fixture(scope="module")
def server(edge_model, retrained, tmp_path_factory):
    """A real server whose current version is 2 (the device starts with version 1), every file of
    which differs from version 1's, so a device holding version 1 downloads them all."""
    root = tmp_path_factory.mktemp("model_store_server")
    srv = ServerThread(server_overrides(root / "state", other_tokenizer_bytes(retrained, root / "v2"),
                                        min_clients=1, goal_clients=5))
    yield srv
    srv.stop()


def other_tokenizer_bytes(source: Path, dest: Path) -> Path:
    """`source` with a tokenizer of other bytes but the same pieces: the SentencePiece protobuf
    with an unknown field appended (field 100, varint 1), which the parser skips."""
    shutil.copytree(source, dest)
    (dest / TOKENIZER_FILE).write_bytes((source / TOKENIZER_FILE).read_bytes() + bytes([0xA0, 0x06, 0x01]))
    manifest = load_manifest(dest)
    entry = FileEntry(sha256_file(dest / TOKENIZER_FILE), (dest / TOKENIZER_FILE).stat().st_size)
    write_manifest(dest, dataclasses.replace(manifest, files={**manifest.files, TOKENIZER_FILE: entry},
                                             tokenizer_sha256=entry.sha256))
    return dest


@pytest.fixture
def client(proxy):
    c = ServerClient(proxy.url, retry=RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0), sleep=lambda s: None)
    yield c
    c.close()


@pytest.fixture
def store(tmp_path, edge_model) -> ModelStore:
    """A device store holding version 1."""
    s = ModelStore(tmp_path / "models")
    s.install_local(edge_model)
    return s


def _leftovers(store: ModelStore) -> list[str]:
    return [p.name for p in leftover_temps(store.root)]


def _versions_on_disk(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.glob("v*") if p.is_dir())


# Local installs ---------------------------------------------------------------------------

def test_install_local_copies_a_verified_version(store, edge_model):
    assert (store.current_version, store.previous_version) == (1, None)
    assert store.current_dir() == store.root / "v1"
    manifest = load_manifest(store.current_dir())
    verify_files(store.current_dir(), manifest)
    for name in (TRAINABLE_FILE, INFERENCE_FILE, TOKENIZER_FILE):
        assert sha256_file(store.root / "v1" / name) == sha256_file(edge_model / name)
    assert _leftovers(store) == []


def test_install_local_refuses_a_damaged_folder(edge_model, tmp_path):
    damaged = shutil.copytree(edge_model, tmp_path / "damaged")
    data = bytearray((damaged / INFERENCE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / INFERENCE_FILE).write_bytes(bytes(data))
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelRejected, match=INFERENCE_FILE):
        store.install_local(damaged)
    assert store.current_version is None and _versions_on_disk(store) == [] and _leftovers(store) == []


# Downloads --------------------------------------------------------------------------------

def test_update_fetches_the_newer_version_and_verifies_it(store, client, proxy, server):
    manifest = store.update_if_newer(client)
    assert manifest is not None and manifest.version == 2
    assert (store.current_version, store.previous_version) == (2, 1)
    verify_files(store.root / "v2", load_manifest(store.root / "v2"))
    served = server.state.store.version_dir(2)
    for name in manifest.files:  # byte for byte what the server published
        assert sha256_file(store.root / "v2" / name) == sha256_file(served / name)
    assert _leftovers(store) == []
    downloads = [r for r in proxy.requests if r.startswith("GET /v1/models/2/") and not r.endswith(MANIFEST_FILE)]
    assert len(downloads) == len(manifest.files)  # every file: none of them is one version 1 holds

    before = len(proxy.requests)
    assert store.update_if_newer(client) is None  # already current: only the manifest is asked for
    assert proxy.requests[before:] == ["GET /v1/models/latest"]


@pytest.mark.parametrize("damaged", [TRAINABLE_FILE, INFERENCE_FILE, TOKENIZER_FILE])
def test_a_file_corrupted_in_transit_is_rejected_and_the_old_version_kept(store, client, proxy, damaged):
    v1_hashes = {p.name: sha256_file(p) for p in (store.root / "v1").iterdir()}
    proxy.corrupt = {damaged}
    with pytest.raises(ModelRejected, match=damaged):
        store.update_if_newer(client)
    assert (store.current_version, store.previous_version) == (1, None)
    assert {p.name: sha256_file(p) for p in (store.root / "v1").iterdir()} == v1_hashes
    verify_files(store.root / "v1", load_manifest(store.root / "v1"))
    assert _versions_on_disk(store) == ["v1"] and _leftovers(store) == []

    proxy.corrupt = set()  # the next attempt, on a clean network, succeeds
    assert store.update_if_newer(client).version == 2 and store.current_version == 2


def test_a_manifest_corrupted_in_transit_is_rejected(store, client, proxy):
    proxy.corrupt = {"/v1/models/latest", MANIFEST_FILE}
    with pytest.raises(ModelRejected):
        store.update_if_newer(client)
    with pytest.raises(ModelRejected):
        store.fetch(client, 2)
    assert store.current_version == 1 and _versions_on_disk(store) == ["v1"] and _leftovers(store) == []


def test_fetching_an_unknown_version_fails_and_changes_nothing(store, client):
    with pytest.raises(ServerError) as refused:
        store.fetch(client, 7)  # the server has no version 7
    assert (refused.value.status, refused.value.code) == (404, "unknown_version")
    assert store.current_version == 1 and _versions_on_disk(store) == ["v1"] and _leftovers(store) == []


def _renaming(old: str, new: str):
    """A proxy rewrite: the manifest lists file `old` under the name `new` (same size and sha256)."""
    def change(content: bytes) -> bytes:
        body = json.loads(content)
        body["files"][new] = body["files"].pop(old)
        return json.dumps(body).encode()
    return change


@pytest.mark.parametrize("name", ["../evil", "ABSOLUTE", "sub/evil", "sub\\evil", "", ".."])
def test_a_manifest_naming_a_path_is_rejected_before_anything_is_written(store, client, proxy, tmp_path, name):
    if name == "ABSOLUTE":
        name = str(tmp_path / "evil")
    proxy.rewrite = {suffix: _renaming(TOKENIZER_FILE, name) for suffix in ("/v1/models/latest", MANIFEST_FILE)}
    with pytest.raises(ModelRejected, match="not a plain file name"):
        store.update_if_newer(client)
    with pytest.raises(ModelRejected, match="not a plain file name"):
        store.fetch(client, 2)
    files_asked = [r for r in proxy.requests if r.startswith("GET /v1/models/2/") and not r.endswith(MANIFEST_FILE)]
    assert files_asked == []
    assert not (tmp_path / "evil").exists() and not (store.root / "evil").exists()
    assert store.current_version == 1 and _versions_on_disk(store) == ["v1"] and _leftovers(store) == []


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "ABSOLUTE"])
def test_install_local_rejects_a_manifest_naming_a_path(edge_model, tmp_path, name):
    from fedkb_core.manifest import write_manifest

    source = Path(shutil.copytree(edge_model, tmp_path / "src"))
    name = str(tmp_path / "outside") if name == "ABSOLUTE" else name
    target = source / name  # the file the manifest points at exists, with the right hash
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"payload")
    manifest = load_manifest(source)
    files = {**manifest.files, name: FileEntry(sha256=sha256_file(target), bytes=target.stat().st_size)}
    write_manifest(source, dataclasses.replace(manifest, version=2, files=files))
    store = ModelStore(tmp_path / "device" / "models")
    with pytest.raises(ModelRejected, match="not a plain file name"):
        store.install_local(source)
    assert sorted(p.name for p in (tmp_path / "device").iterdir()) == ["models"]  # nothing beside the store
    assert list(store.root.iterdir()) == [] and store.current_version is None


def test_a_download_longer_than_its_manifest_says_is_cut_off(store, client, proxy):
    padding = 128 << 20  # far more than the loopback socket buffers hold
    proxy.pad = {TRAINABLE_FILE: padding}
    with pytest.raises(ModelRejected, match=TRAINABLE_FILE):
        store.update_if_newer(client)
    wait_for(lambda: proxy.padded, what="the proxy to finish sending")
    ((path, sent, whole),) = proxy.padded
    assert path.endswith(TRAINABLE_FILE) and not whole and sent < padding // 2  # the device hung up early
    assert store.current_version == 1 and _versions_on_disk(store) == ["v1"] and _leftovers(store) == []

    proxy.pad = {}  # the honest file is accepted
    assert store.update_if_newer(client).version == 2


# Swaps, rollback, crash leftovers ---------------------------------------------------------

def test_rollback_keeps_exactly_one_previous_version(store, edge_model, tmp_path):
    store.install_local(bump_version(edge_model, tmp_path / "b2", 2))
    store.install_local(bump_version(edge_model, tmp_path / "b3", 3))
    assert (store.current_version, store.previous_version) == (3, 2)
    assert _versions_on_disk(store) == ["v2", "v3"]  # v1 was pruned when v3 arrived
    assert store.rollback() == 2
    assert (store.current_version, store.previous_version) == (2, 3)
    verify_files(store.current_dir(), load_manifest(store.current_dir()))
    assert store.rollback() == 3  # rolling back a rollback goes forward again
    assert _versions_on_disk(store) == ["v2", "v3"]


def test_rollback_without_a_previous_version_fails(store):
    with pytest.raises(FedkbError, match="no previous"):
        store.rollback()
    assert store.current_version == 1


def test_install_without_activation_keeps_the_current_version(store, edge_model, tmp_path):
    store.install_local(bump_version(edge_model, tmp_path / "b2", 2), activate=False)
    assert store.current_version == 1 and store.has_version(2)
    store.activate(2)
    assert (store.current_version, store.previous_version) == (2, 1)


def test_a_download_cut_short_by_a_crash_is_cleaned_up_at_start(store, edge_model):
    staging = temp_path(store.root / "v2")  # the name a download stages under
    staging.mkdir()
    (staging / TRAINABLE_FILE).write_bytes((edge_model / TRAINABLE_FILE).read_bytes()[:1000])
    half = store.root / "v2"  # renamed but never made current (no manifest yet either)
    half.mkdir()
    (half / TOKENIZER_FILE).write_bytes(b"partial")

    reopened = ModelStore(store.root)
    assert _leftovers(reopened) == []
    assert reopened.current_version == 1 and not reopened.has_version(2)
    verify_files(reopened.current_dir(), load_manifest(reopened.current_dir()))
    reopened.install_local(bump_version(edge_model, store.root.parent / "b2", 2))  # the leftover v2 is replaced
    verify_files(reopened.root / "v2", load_manifest(reopened.root / "v2"))


# The suggestion strip across swaps ---------------------------------------------------------

def test_listener_swaps_suggestions_with_the_model(store, retrained, edge_model):
    live = LiveSuggester(store.current_dir())
    store.add_listener(live.swap)
    old = live.suggest("to be or not to")
    live.reset()
    store.install_local(retrained)
    assert (live.version, live.swaps, store.current_version) == (2, 1, 2)
    new = live.suggest("to be or not to")
    assert len(old) == len(new) == 3 and old != new  # other weights, other words
    live.reset()
    store.rollback()
    assert live.version == 1 and live.suggest("to be or not to") == old


def test_suggestions_keep_being_served_during_swaps(store, retrained):
    live = LiveSuggester(store.current_dir())
    store.add_listener(live.swap)
    store.install_local(retrained)
    with Typist(lambda: live.suggest("to be or not to"), live.reset) as typist:
        for _ in range(6):
            typist.wait_for_more(3)  # let the typist get a few suggestions in between swaps
            store.rollback()
    assert typist.errors == []
    assert live.swaps == 7 and live.version == store.current_version
    assert typist.results and all(len(words) == 3 for words in typist.results)  # the strip never went blank
