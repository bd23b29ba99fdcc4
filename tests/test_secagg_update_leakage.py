"""Under secure aggregation the embedding-row attack (simulation/attacks.py) gets nothing from what
the server holds about one device: each masked upload, and every partial sum the folder
checkpoints before unmasking, ranks the rows no better than chance; only the unmasked cohort sum
(the release, as under plain FedAvg) carries the words, and it carries everybody's.

The device's update is the real one of tests/test_privacy_update_leakage.py (a real edge-runtime
device's LiteRT upload, the twelve private messages); four other devices hold the same update
with its embedding rows shuffled (other users typing other words, with the same statistics).
Each is encoded on the common grid, masked by real participants and summed by the real cohort,
in-process: tests/test_secagg_server.py shows the HTTP server stores no more than this (no file
or table holds any device's vector). The attack decodes a held vector as the server best could:
the grid's signed integers times its step, rotated back with the round's seed (the server knows
it), as one device's embedding delta.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.secagg_cohort import SecAggCohort
from edge_runtime.secagg_participant import SecAggParticipant
from fedkb_core import hadamard
from fedkb_core.secagg.integer_encoding import MASK_BITS, SecAggGrid, add_mod, decode_sum, encode, modulus_bits, tuned_steps
from simulation.attacks import embedding_row_attack
from tests.fixtures_edge import shakespeare_edge_model, state  # noqa: F401
from tests.test_privacy_update_leakage import upload  # noqa: F401  (the real upload, a module fixture)

DEVICES = 5
ROUND = 11
CHANCE = 1e-6  # a held vector "beats chance" if a ranking that knows nothing did as well this rarely


def as_embedding(values: np.ndarray, grid: SecAggGrid, shape) -> np.ndarray:
    """A uint32 vector on the grid read as one device's embedding delta (signed, scaled, rotated back)."""
    r = grid.modulus_bits
    signed = values[: grid.padded].astype(np.int64) & ((1 << r) - 1)
    signed[signed >= 1 << (r - 1)] -= 1 << r
    blocks = signed.reshape(-1, hadamard.BLOCK) * grid.block_steps[:, None]
    return hadamard.unrotate(blocks, grid.rotation_seed, grid.length).reshape(shape)


@pytest.mark.parametrize("tuned", [True, False], ids=["tuned grid, 8 bits", "fixed grid, 12 bits (DP)"])
def test_the_attack_on_everything_a_secagg_server_holds_is_at_chance(upload, tmp_path, tuned):  # noqa: F811
    delta, typed, _, clip_norm = upload
    rng = np.random.default_rng(3)
    ids = [f"dev-{i}" for i in range(DEVICES)]
    deltas = {ids[0]: delta}
    typed_of = {ids[0]: typed}
    for d in ids[1:]:
        order = rng.permutation(delta.shape[0])
        deltas[d] = delta[order]  # row j of this user's delta is row order[j] of the real one
        typed_of[d] = {int(j) for j in np.flatnonzero(np.isin(order, list(typed)))}
    seed = int(rng.integers(1 << 62))
    if tuned:
        grid = SecAggGrid(bits=8, modulus_bits=8, clip_norm=clip_norm, length=delta.size, rotation_seed=seed,
                          max_examples=64, tuned_steps=tuned_steps(8, DEVICES, clip_norm, hadamard.num_blocks(delta.size)))
    else:
        grid = SecAggGrid(bits=12, modulus_bits=modulus_bits(12, DEVICES), clip_norm=clip_norm, length=delta.size,
                          rotation_seed=seed, max_examples=64, weighted=False)
    if tuned:  # as from the second round on: the steps follow the previous sum's spread (the first round's prior)
        prior = np.zeros(grid.vector_length, np.uint32)
        for d in ids:
            add_mod(prior, encode(deltas[d].ravel().astype(np.float32), 64, grid, rng), MASK_BITS)
        measured = [x / DEVICES for x in decode_sum(prior, grid, count=DEVICES).block_rms]
        grid = dataclasses.replace(grid, tuned_steps=tuned_steps(8, DEVICES, clip_norm, len(measured), measured))
    xs = {d: encode(deltas[d].ravel().astype(np.float32), 64, grid, rng) for d in ids}
    k = len(typed)

    def recovery(values, who=ids[0]):
        return embedding_row_attack(as_embedding(values, grid, delta.shape), typed_of[who], ks=(k,))[0]

    # Control: the attack reads the device's words from its own encoded, unmasked vector.
    control = recovery(xs[ids[0]])
    assert control.random_tail < 1e-12 and control.fraction > 0.5, control

    participants = {d: SecAggParticipant(tmp_path / d, d) for d in ids}
    cohort = SecAggCohort(ROUND, vector_length=grid.vector_length, modulus_bits=MASK_BITS, min_survivors=2,
                          tolerated_dropout=0.2)
    for d in ids:
        cohort.advertise(d, participants[d].advertise(ROUND))
    for d, neighbours in cohort.close_advertising(bytes(range(32))).items():
        cohort.receive_shares(d, participants[d].share(neighbours))
    for d, inbox in cohort.close_sharing().items():
        participants[d].receive(inbox)

    held = []  # what the server holds before unmasking: each upload as it arrives, each checkpoint
    partial = np.zeros(grid.vector_length, np.uint32)
    for d in ids:
        masked = participants[d].mask(xs[d])
        held.append((f"upload of {d}", masked))
        cohort.fold(d, masked)
        add_mod(partial, masked, MASK_BITS)
        held.append((f"sum after {d}", partial.copy()))
    np.testing.assert_array_equal(cohort.running_sum, partial)
    for name, values in held:
        for who in ids:
            r = recovery(values, who)
            print(f"{name}: top {k} rows hold {r.hits}/{r.typed} of {who}'s words "
                  f"(chance {r.random_fraction:.1%}, P[random ≥ this] = {r.random_tail:.2g})")
            assert r.random_tail > CHANCE, (name, who, r)

    for d, request in cohort.close_input().items():
        cohort.receive_unmask(d, participants[d].unmask(request))
    total = cohort.result()
    released = decode_sum(total, grid, count=DEVICES).deltas(grid.length).reshape(delta.shape)
    tails = [embedding_row_attack(released, typed_of[d], ks=(k,))[0].random_tail for d in ids]
    print("the unmasked sum (the release): P[random ≥ this] per device", [f"{t:.1g}" for t in tails])
    # The release is the cohort's bag of words (what DP, not SecAgg, bounds): the union of what the
    # five typed, not one device's words apart from the others'.
    union = set().union(*typed_of.values())
    cohort_words = embedding_row_attack(released, union, ks=(len(union),))[0]
    print(f"the release's top {len(union)} rows hold {cohort_words.hits}/{len(union)} of the cohort's words (chance {cohort_words.random_fraction:.0%}, P[random ≥ this] = {cohort_words.random_tail:.1g})")
    assert cohort_words.random_tail < CHANCE, cohort_words


def test_the_decoding_the_attack_uses_is_the_servers_own(upload):  # noqa: F811
    """`as_embedding` of one encoded vector equals the server's decode of a sum of one (so the
    attack above reads held vectors exactly as the server would read a sum)."""
    delta, _, _, clip_norm = upload
    grid = SecAggGrid(bits=12, modulus_bits=13, clip_norm=clip_norm, length=delta.size, rotation_seed=7,
                      max_examples=64, weighted=False)
    x = encode(delta.ravel().astype(np.float32), 64, grid, np.random.default_rng(0))
    server = decode_sum(x, grid, count=1).deltas(grid.length).reshape(delta.shape)
    np.testing.assert_allclose(as_embedding(x, grid, delta.shape), server, rtol=1e-6, atol=1e-9)
    assert np.linalg.norm(server - delta) < 0.05 * np.linalg.norm(delta) + np.sqrt(grid.padded) * grid.step
