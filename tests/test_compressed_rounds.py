"""A real server (HTTP on loopback, real SQLite) running rounds with `hadamard` uploads: the result
equals the float32 round within the quantizer's error bound, DP-FedAvg composes with it, uploads in
another encoding, bits, seed or length are refused with nothing folded, and the round's rotation
seed is in the task and survives a restart."""

from __future__ import annotations

import numpy as np
import requests
from safetensors.numpy import load, load_file

from aggregator.dp import DPGaussianSum
from aggregator.fedavg import WeightedSum
from fedkb_core.clipping import clip_by_global_norm
from fedkb_core.stochastic_rounding import num_levels
from fedkb_core.update_encoding import BLOCK
from fedkb_core.wire import SCALES, WeightSpec, decode_rotated, decode_update
from tests.fixtures_aggregator import (ADMIN, TINY_SHAPES, Device, make_server, random_deltas,  # noqa: F401
                                       status, wait_for, weights_model)

SPECS = [WeightSpec(k, s) for k, s in TINY_SHAPES.items()]


def _upload_round(server, deltas_list, examples, **meta):
    """Each device takes a task, clips to its norm (as edge_runtime does) and uploads in the task's
    encoding; returns (task, bodies)."""
    bodies, task = [], None
    for deltas, n in zip(deltas_list, examples, strict=True):
        device = Device(server.url)
        assert device.enroll().status_code == 201
        task = device.task()
        clipped, norm = clip_by_global_norm(deltas, task.clip_norm)
        fields = dict(encoding=task.encoding, update_bits=task.update_bits, rotation_seed=task.rotation_seed,
                      update_norm=norm, **meta)
        body = device.body(task, clipped, num_examples=n, **fields)
        r = device.upload(task.round_id, body)
        assert r.status_code == 200, r.text
        bodies.append(body)
    return task, bodies


def _version(server, v: int) -> dict:
    wait_for(lambda: status(server.url)["model_version"] == v, what=f"version {v}")
    return load_file(server.state.config.state_dir / "models" / str(v) / "weights.safetensors")


def _flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(tensors[k]).astype(np.float64) for k in sorted(tensors)])


def test_a_compressed_round_equals_the_float32_round_within_the_quantizers_bound(make_server, weights_model):
    """FedAvg (server SGD at 1.0) over the same three clipped updates, once uploaded as float32 and
    once as `hadamard` at 2 bits: the published weights differ by the mean's quantization error.

    The bound. In the rotated domain device i's error e_i has independent coordinates, zero mean,
    |e_ik| ≤ Δ_i = 2 s_i / (2^b − 1) (s_i its block's scale, from its upload) and variance ≤ Δ_i²/4.
    The mean's error ē = Σ w_i e_i (w_i = n_i / Σn) then has E‖ē‖² ≤ B = Σ_i w_i² · d · Δ_i²/4 over
    the d = 16,384 coordinates of the one block; rotating back is orthogonal and dropping the
    padding only shortens it. ‖ē‖² is a sum of d independent terms, each in [0, c] with
    c = (Σ w_i Δ_i)², so by Hoeffding P(‖ē‖² ≥ 2B) ≤ exp(−2B²/(d c²)), here below e^−2000: the
    test asserts ‖ē‖² ≤ 2B, and that ē is not zero (the uploads really were compressed). The
    float32 round itself is exact to float32 rounding (1e-7 relative, far below B).
    """
    updates = [random_deltas(TINY_SHAPES, 30 + i, scale=s) for i, s in enumerate((0.02, 0.2, 0.05))]
    examples = (5, 9, 20)
    exact = make_server(weights_model, goal_clients=3)
    _upload_round(exact, updates, examples)
    compressed = make_server(weights_model, goal_clients=3, update_encoding="hadamard", update_bits=2)
    task, bodies = _upload_round(compressed, updates, examples)
    assert (task.encoding, task.update_bits) == ("hadamard", 2) and task.rotation_seed is not None

    error = _flat(_version(compressed, 2)) - _flat(_version(exact, 2))
    weights = np.array(examples, np.float64) / sum(examples)
    steps = np.array([2.0 * float(load(b)[SCALES][0]) / num_levels(2) for b in bodies])  # Δ_i (one block each)
    bound = float(np.sum(weights ** 2 * BLOCK * steps ** 2 / 4))
    assert 0 < float(error @ error) <= 2 * bound, (float(error @ error), bound)
    s = status(compressed.url)
    assert s["totals"]["accepted"] == 3


def test_dp_fedavg_with_compressed_updates_clips_what_it_decodes_at_the_clip_norm(make_server, weights_model):
    """DP-FedAvg (Z = 0, so the release is deterministic) with 1-bit uploads: the server decodes each
    update, clips the decoded vector at C (the sensitivity the noise is calibrated to, so not the
    allowance a round without DP gives the quantizer's noise), sums with unit weights and divides
    by the goal."""
    clip = 0.5
    server = make_server(weights_model, clip_norm=clip, goal_clients=4, min_clients=2, dp_noise_multiplier=0.0,
                         server_optimizer="sgd", server_lr=1.0, update_encoding="hadamard", update_bits=1)
    updates = [random_deltas(TINY_SHAPES, 50 + i, scale=s) for i, s in enumerate((0.01, 0.3, 0.02))]
    task, bodies = _upload_round(server, updates, (3, 7, 11))
    r = requests.post(f"{server.url}/v1/admin/rounds/current/end", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    expected = DPGaussianSum(WeightedSum(TINY_SHAPES), clip_norm=clip, noise_multiplier=0.0, denominator=4)
    decoded_norms = []
    for body in bodies:
        # The server measures (and clips) the norm of the whole decoded vector in the rotated domain,
        # padding included: never less than the norm of what it adds once rotated back.
        rotated = decode_rotated(body, SPECS).values.astype(np.float64)
        decoded_norms.append(expected.add(decode_update(body, SPECS).deltas, 1, norm=float(np.linalg.norm(rotated))))
    # Rounding lengthened the update the device had clipped to C (1 bit: several times over); the
    # server's clip at C takes that out.
    assert max(decoded_norms) > 1.5 * clip
    mean = expected.release(None)
    w1, w2 = load_file(weights_model / "weights.safetensors"), _version(server, 2)
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + mean[k], rtol=1e-5, atol=1e-6)
    last = status(server.url)["last_round"]
    assert (last["dp_denominator"], last["clip_norm"], last["total_examples"]) == (4, clip, 3)


def test_uploads_not_in_the_tasks_encoding_are_refused_and_nothing_is_folded(make_server, weights_model):
    server = make_server(weights_model, goal_clients=2, update_encoding="hadamard", update_bits=4)
    device = Device(server.url)
    assert device.enroll().status_code == 201
    task = device.task()
    deltas = random_deltas(TINY_SHAPES, 7)
    asked = dict(encoding="hadamard", update_bits=4, rotation_seed=task.rotation_seed)
    wrong_shapes = {**deltas, "dense/bias": np.zeros(17, np.float32)}
    cases = [
        (device.body(task, deltas), "encoding_mismatch"),  # float32
        (device.body(task, deltas, encoding="float16"), "encoding_mismatch"),
        (device.body(task, deltas, **{**asked, "update_bits": 8}), "bits_mismatch"),
        (device.body(task, deltas, **{**asked, "rotation_seed": (task.rotation_seed + 1) % 2**63}), "seed_mismatch"),
        (device.body(task, wrong_shapes, **asked), "length_mismatch"),
    ]
    for body, code in cases:
        r = device.upload(task.round_id, body)
        assert (r.status_code, r.json()["error"]) == (400, code), r.text
    s = status(server.url)
    assert s["totals"]["accepted"] == 0 and s["round"]["accepted_updates"] == 0
    r = device.upload(task.round_id, device.body(task, deltas, **asked))  # the right one still goes in
    assert r.status_code == 200, r.text


def test_the_rotation_seed_is_drawn_per_round_kept_with_it_and_survives_a_restart(make_server, weights_model,
                                                                                 tmp_path):
    state_dir = tmp_path / "kept"
    first = make_server(weights_model, state_dir=state_dir, goal_clients=1, min_clients=1, update_encoding="hadamard")
    task1, _ = _upload_round(first, [random_deltas(TINY_SHAPES, 1)], (4,))
    _version(first, 2)
    seed2 = Device(first.url)
    assert seed2.enroll().status_code == 201
    task2 = seed2.task()
    assert task2.round_id == task1.round_id + 1 and task2.rotation_seed != task1.rotation_seed
    assert task1.update_bits == 8  # the default bits of hadamard
    first.stop()
    again = make_server(weights_model, state_dir=state_dir, goal_clients=1, min_clients=1, update_encoding="hadamard")
    seed2.url = again.url  # the same device and token, on the restarted server
    resumed = seed2.task()
    assert (resumed.round_id, resumed.rotation_seed) == (task2.round_id, task2.rotation_seed)


def test_a_rotated_sum_resumes_from_its_checkpoint_after_a_restart(tmp_path):
    """A `hadamard` round's running sum lives in the rotated domain; it is checkpointed and resumed
    like any other (a new `Folder` is what a restarted server has), and rotated back once it ends:
    the same mean as decoding each update by itself, clipping it and averaging."""
    from aggregator import db
    from aggregator.config import load_config
    from aggregator.fedavg import ClippedSum
    from aggregator.folding import Folder, write_blob
    from aggregator.rounds import round_settings
    from fedkb_core.update_encoding import clip_inflation
    from fedkb_core.wire import UpdateMetadata, encode_update

    def start(name):
        state = tmp_path / name
        db.init_db(state)
        conn = db.connect(state)
        config = load_config(environ={}, overrides={"testing": True, "state_dir": state, "clip_norm": 0.8,
                                                    "update_encoding": "hadamard", "update_bits": 3})
        with db.transaction(conn):
            round_id = db.insert_round(conn, round_settings(config, model_version=1, batch_size=2, now=0.0))
        return state, conn, db.get_round(conn, round_id)

    def accept(state, conn, round_, i, body, n):
        blob = write_blob(state, round_.id, f"dev{i}", body)
        with db.transaction(conn):
            db.add_update(conn, round_id=round_.id, device_id=f"dev{i}", num_examples=n, update_norm=1.0,
                          device_norm=0.0, body_sha256=str(i), size=len(body), blob=str(blob.relative_to(state)))

    state, conn, round_ = start("resumed")
    bodies = []
    for i in range(4):
        clipped, norm = clip_by_global_norm(random_deltas(TINY_SHAPES, 80 + i, scale=0.3), 0.8)
        meta = UpdateMetadata(round_id=round_.id, model_version=1, device_id=f"dev{i}", num_examples=2 + i,
                              clip_norm=0.8, update_norm=norm, encoding="hadamard", update_bits=3,
                              rotation_seed=round_.rotation_seed)
        bodies.append((encode_update(clipped, meta, rng=np.random.default_rng(i)), 2 + i))
    for i, (body, n) in enumerate(bodies[:2]):
        accept(state, conn, round_, i, body, n)
    Folder(state, checkpoint_interval=0.0).fold_pending(conn, round_, SPECS, force_checkpoint=True)
    for i, (body, n) in enumerate(bodies[2:], start=2):
        accept(state, conn, round_, i, body, n)
    restarted = Folder(state, checkpoint_interval=0.0)
    restarted.fold_pending(conn, round_, SPECS)
    resumed = restarted.current(round_.id)
    assert resumed.rotated and resumed.total.count == 4
    mean = resumed.in_weight_layout().total.mean()

    reference = ClippedSum(WeightedSum(TINY_SHAPES), 0.8 * clip_inflation(3))
    for body, n in bodies:
        rotated = decode_rotated(body, SPECS).values.astype(np.float64)
        reference.add(decode_update(body, SPECS).deltas, n, norm=float(np.linalg.norm(rotated)))
    for k, v in reference.mean().items():
        np.testing.assert_allclose(mean[k], v, rtol=1e-5, atol=1e-6)
    conn.close()


def test_dp_ftrl_with_compressed_updates_releases_from_the_rotated_back_sum(make_server, weights_model):
    """DP-FTRL (Z = 0, server lr 1, no momentum: the first release is w + Σ/goal) over 4-bit uploads:
    the tree's release reads the round's sum after it is rotated back, clipped at C as DP needs."""
    clip = 0.5
    server = make_server(weights_model, clip_norm=clip, goal_clients=3, min_clients=2, dp_noise_multiplier=0.0,
                         dp_mechanism="ftrl", server_optimizer="sgd", server_lr=1.0, update_encoding="hadamard",
                         update_bits=4)
    updates = [random_deltas(TINY_SHAPES, 60 + i, scale=s) for i, s in enumerate((0.01, 0.3, 0.02))]
    _, bodies = _upload_round(server, updates, (3, 7, 11))
    expected = DPGaussianSum(WeightedSum(TINY_SHAPES), clip_norm=clip, noise_multiplier=0.0, denominator=3)
    for body in bodies:
        rotated = decode_rotated(body, SPECS).values.astype(np.float64)
        expected.add(decode_update(body, SPECS).deltas, 1, norm=float(np.linalg.norm(rotated)))
    mean = expected.release(None)
    w1, w2 = load_file(weights_model / "weights.safetensors"), _version(server, 2)
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + mean[k], rtol=1e-5, atol=1e-6)
