"""What one device's update still reveals: the embedding-row attack on a real upload, measured.

A real edge-runtime `Device` (LiteRT training) uploads through a recording relay to a real
`fedkb serve`; the attack (`simulation.attacks`) ranks the embedding rows of the bytes that went
over the wire by how much they changed and counts the device's typed token ids among the top k.
The figure is printed (run with `-s`), not compared to a magic number: the test asserts only
that the recovery is far beyond what a ranking that knows nothing gets, computed from the
vocabulary size. docs/privacy.md cites the figure.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import requests

from datasets.tokenizer import load_tokenizer
from edge_runtime.client import RetryPolicy, ServerClient
from edge_runtime.device import Device, DeviceConfig
from edge_runtime.device_state import ScriptedDeviceState
from fedkb_core.manifest import TOKENIZER_FILE, load_manifest
from fedkb_core.wire import decode_update
from simulation.attacks import RowRecovery, embedding_row_attack, rows_by_change
from tests.fixtures_aggregator import SECRET, ServeProcess, wait_for
from tests.fixtures_edge import PRIVATE_MESSAGES, RecordingProxy, shakespeare_edge_model, state  # noqa: F401

FIRST_REGULAR_ID = 4  # pad, unk, bos, eos come first: not typed


def typed_ids(tokenizer, messages: list[str]) -> set[int]:
    return {t for ids in tokenizer.encode(messages, out_type=int) for t in ids if t >= FIRST_REGULAR_ID}


@contextlib.contextmanager
def one_device_round(model: Path, root: Path, *serve_args: str):
    """A real `fedkb serve` whose round closes on one update, and one device that has uploaded it
    through a recording relay: yields (device, the upload's bytes as sent, server)."""
    server = ServeProcess(root / "state", model, "--min-clients", "1", "--goal-clients", "1", "--round-timeout", "600",
                          *serve_args, log=root / "serve.log")
    recorder = RecordingProxy(server.url)
    text = root / "typed.txt"
    text.write_text("\n".join(PRIVATE_MESSAGES) + "\n")
    client = ServerClient(recorder.url, retry=RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0),
                          sleep=lambda s: None)
    device = Device(DeviceConfig(server_url=recorder.url, home=root / "phone", seed=5, suggestions=False),
                    state=ScriptedDeviceState(state()), client=client)
    try:
        device.ensure_enrolled(SECRET)
        device.import_text(text)
        report = device.run_once()
        assert report.action == "accepted", report
        (body,) = [r.body for r in recorder.requests() if r.method == "POST" and r.path.endswith("/updates")]
        yield device, body, server
    finally:
        device.close()
        recorder.stop()
        server.stop()


@pytest.fixture(scope="module")
def upload(shakespeare_edge_model, tmp_path_factory):
    """(the embedding delta one device uploaded, as decoded from the recorded bytes; its typed ids;
    the tokenizer; the clip norm)."""
    with one_device_round(shakespeare_edge_model, tmp_path_factory.mktemp("update_leakage")) as (_, body, _):
        pass
    update = decode_update(body, list(load_manifest(shakespeare_edge_model).weights))
    tokenizer = load_tokenizer(shakespeare_edge_model / TOKENIZER_FILE)
    print(f"upload: update norm {update.metadata.update_norm:.3f} before clipping to {update.metadata.clip_norm}")
    return update.deltas["embedding"], typed_ids(tokenizer, PRIVATE_MESSAGES), tokenizer, update.metadata.clip_norm


def test_one_upload_is_a_bag_of_its_users_words(upload):
    delta, typed, tokenizer, _ = upload
    vocab = delta.shape[0]
    recoveries = embedding_row_attack(delta, typed, ks=(len(typed), 40, 86))
    for r in recoveries:
        print(f"top {r.k} of {vocab} rows hold {r.hits}/{r.typed} typed ids ({r.fraction:.1%}, precision "
              f"{r.precision:.1%}; "
              f"random ranking: {r.random_fraction:.1%}, P[random ≥ this] = {r.random_tail:.1e})")
    top = rows_by_change(delta)[:40]
    print("top 40 typed pieces:", " ".join(tokenizer.id_to_piece(int(t)) for t in top if int(t) in typed))
    at_k = recoveries[0]
    assert at_k.typed >= 30 and vocab >= 10 * at_k.typed  # the words are a small part of the vocabulary
    # Robust, not a magic number: a ranking that knows nothing gets k/V on average, and this many
    # hits would come from it with a probability below one in a billion.
    assert at_k.random_tail < 1e-9 and at_k.fraction > 5 * at_k.random_fraction, at_k


def test_the_attack_ranks_rows_by_their_change():
    delta = np.zeros((10, 3), np.float32)
    delta[7] = [3, 0, 0]
    delta[2] = [0, 2, 0]
    delta[5] = [0, 0, -2.5]
    assert rows_by_change(delta)[:4].tolist() == [7, 5, 2, 0]  # by L2 norm, then by index
    (two, all_rows) = embedding_row_attack(delta, {2, 5, 9}, ks=(2, 50))
    assert (two.hits, two.k, two.fraction, two.precision) == (1, 2, 1 / 3, 1 / 2)
    assert (all_rows.k, all_rows.hits, all_rows.random_tail) == (10, 3, 1.0)  # capped; every row is a hit
    # Hypergeometric tail: both typed rows in a random top 2 of 4 is 1 in 6.
    assert RowRecovery(k=2, hits=2, typed=2, vocab=4).random_tail == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="typed ids"):
        embedding_row_attack(delta, {10}, ks=(2,))


NOISE_MULTIPLIERS = (0.0, 0.0003, 0.001, 0.003, 0.01, 0.3, 1.0)


def test_what_gaussian_noise_of_multiplier_z_leaves_to_the_attack(upload):
    """The strongest adversary DP is defined against knows every other device's update, so from a
    DP-FedAvg release it gets this device's clipped Δ plus N(0, (Z·C)²) per coordinate. The noise
    is drawn here, in numpy, on the real upload, so that many Z and draws cost milliseconds (the
    server's DP mode draws the same distribution; the test below attacks a real release); the
    recovery is averaged over draws. A weak attack failing is not privacy: ε is the bound on
    every attack, and Z = 0.003 gives no meaningful ε even where this attack is near chance."""
    delta, typed, _, clip_norm = upload
    rng = np.random.default_rng(0)
    k = len(typed)
    print(f"embedding rows carry {np.linalg.norm(delta) / clip_norm:.1%} of C; top {k} rows of {delta.shape[0]}:")
    tails = {}
    for z in NOISE_MULTIPLIERS:
        draws = [embedding_row_attack(delta + rng.normal(scale=z * clip_norm, size=delta.shape), typed, ks=(k,))[0]
                 for _ in range(1 if z == 0 else 20)]
        tails[z] = float(np.median([r.random_tail for r in draws]))
        print(f"  Z = {z:<6} recovered {np.mean([r.fraction for r in draws]):.1%} (random {draws[0].random_fraction:.1%}; "
              f"median P[random ≥ this] = {tails[z]:.1e})")
    assert tails[0.0] < 1e-9  # no noise: the bag of words
    # At the smallest noise multiplier a DP deployment would use, the attack does no better than chance.
    assert tails[0.3] > 1e-3 and tails[1.0] > 1e-3, tails


@pytest.mark.parametrize("z", [0.0, 0.3])
def test_the_attack_on_what_a_dp_fedavg_server_publishes(shakespeare_edge_model, tmp_path, z):
    """The downloader's view: a real `fedkb serve --dp-noise-multiplier Z` closes a round on one
    device's update and publishes version 2; the attack runs on version 2 − version 1 as a device
    downloads them (server SGD at rate 1, so the release is the noised, clipped mean itself). With
    Z = 0 that is the bag of words; at Z = 0.3 the attack is at chance."""
    flags = ("--dp-noise-multiplier", str(z), "--dp-population", "846", "--server-optimizer", "sgd",
             "--server-lr", "1.0")
    with one_device_round(shakespeare_edge_model, tmp_path, *flags) as (device, _, server):
        wait_for(lambda: requests.get(f"{server.url}/v1/status", timeout=5).json()["model_version"] == 2,
                 what="version 2 published")
        device.models.fetch(device.client, 2, activate=True)
        released = {}
        for version in (1, 2):
            _, weights = device.trainables.load(device.models.version_dir(version))
            released[version] = np.array(weights["embedding"], dtype=np.float64)
    tokenizer = load_tokenizer(shakespeare_edge_model / TOKENIZER_FILE)
    typed = typed_ids(tokenizer, PRIVATE_MESSAGES)
    (r,) = embedding_row_attack(released[2] - released[1], typed, ks=(len(typed),))
    print(f"Z = {z}: the published version's top {r.k} rows hold {r.hits}/{r.typed} typed ids ({r.fraction:.1%}; "
          f"random {r.random_fraction:.1%}; P[random ≥ this] = {r.random_tail:.1e})")
    if z == 0:
        assert r.random_tail < 1e-9, r
    else:  # one draw: a ranking at chance falls below 1e-6 with probability at most 1e-6
        assert r.random_tail > 1e-6, r
