"""SecAgg+ protocol logic (docs/secure_aggregation.md, "Protocol logic"): whole rounds in-process
between real participants (each over its own state folder) and a cohort, with dropouts at every
stage, restarts at every stage, every refusal code against a hostile message, and what the server
holds (never one device's input)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from aggregator import secagg_cohort as sc
from aggregator.secagg_cohort import CohortAbandoned, SecAggCohort, SecAggRejected, key_hash
from edge_runtime import secagg_participant as sp
from edge_runtime.secagg_participant import SecAggParticipant, SecAggRefused
from fedkb_core.protocol import ProtocolError
from fedkb_core.secagg import key_agreement, shamir
from fedkb_core.secagg.messages import (MAX_ENTRIES, KeyAdvertisement, NeighbourEntry, NeighbourList, ShareInbox,
                                        ShareUpload, UnmaskRequest, UnmaskResponse)

BITS = 20
LENGTH = 1000
ROUND = 7
SEED = bytes(range(32))


def ids_of(n: int) -> list[str]:
    return [f"d{i:02d}" for i in range(n)]


def inputs(ids, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 1 << BITS, LENGTH, dtype=np.uint32) for d in ids}


def expected_sum(xs, members) -> np.ndarray:
    return (sum(xs[d].astype(np.uint64) for d in members) % (1 << BITS)).astype(np.uint32)


class Round:
    """One round between participants in `root/<id>` and a cohort; each stage a method, with the
    devices that take part in it (default: everyone still in)."""

    def __init__(self, root: Path, n: int, *, round_id=ROUND, degree=None, min_survivors=3, tolerated_dropout=0.3,
                 seen_keys=None, ids=None):
        self.root, self.round_id = root, round_id
        self.ids = ids or ids_of(n)
        self.devices = {d: SecAggParticipant(root / d, d) for d in self.ids}
        self.cohort = SecAggCohort(round_id, vector_length=LENGTH, modulus_bits=BITS, min_survivors=min_survivors,
                                   tolerated_dropout=tolerated_dropout, degree=degree, seen_keys=seen_keys)
        self.xs = inputs(self.ids, seed=round_id)
        self.ads, self.lists, self.uploads, self.inboxes, self.masked, self.requests, self.responses = (
            {}, {}, {}, {}, {}, {}, {})

    def restart(self, who=None):
        for d in who or self.ids:
            self.devices[d] = SecAggParticipant(self.root / d, d)

    def advertise(self, who=None):
        for d in who if who is not None else self.ids:
            self.ads[d] = self.devices[d].advertise(self.round_id)
            self.cohort.advertise(d, self.ads[d])

    def share(self, who=None, seed=SEED):
        self.lists = self.cohort.close_advertising(seed)
        for d in who if who is not None else self.lists:
            self.uploads[d] = self.devices[d].share(self.lists[d])
            self.cohort.receive_shares(d, self.uploads[d])

    def receive(self, who=None):
        self.inboxes = self.cohort.close_sharing()
        for d in who if who is not None else self.inboxes:
            self.devices[d].receive(self.inboxes[d])

    def mask(self, who=None):
        for d in who if who is not None else self.inboxes:
            self.masked[d] = self.devices[d].mask(self.xs[d])
            assert self.cohort.fold(d, self.masked[d])

    def unmask(self, who=None):
        self.requests = self.cohort.close_input()
        for d in who if who is not None else self.requests:
            self.responses[d] = self.devices[d].unmask(self.requests[d])
            self.cohort.receive_unmask(d, self.responses[d])

    def run(self, *, drop=None):
        """The whole round; drop = {stage: devices that stop before it} (stages of STAGES)."""
        drop = drop or {}
        out: set[str] = set()
        self.advertise()
        for stage in STAGES:
            out |= set(drop.get(stage, ()))
            if stage == "share":
                self.share([d for d in self.ids if d not in out])
            elif stage == "receive":
                self.inboxes = self.cohort.close_sharing()
                for d in self.inboxes:
                    if d not in out:
                        self.devices[d].receive(self.inboxes[d])
            elif stage == "mask":
                self.mask([d for d in self.inboxes if d not in out])
            else:
                self.unmask([d for d in self.cohort.state.folded if d not in out])
        return self.cohort.result()


STAGES = ("share", "receive", "mask", "unmask")  # a device that stops before this stage


# -- whole rounds -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, degree, dropout", [(5, None, 0.25), (8, None, 0.3), (12, None, 0.3), (12, 6, 0.3),
                                               (12, 8, 0.3), (11, 4, 0.25)])
def test_a_whole_round_gives_the_exact_sum(tmp_path, n, degree, dropout):
    r = Round(tmp_path, n, degree=degree, tolerated_dropout=dropout)  # k = 4 tolerates 1 lost neighbour
    total = r.run()
    assert total.dtype == np.uint32
    np.testing.assert_array_equal(total, expected_sum(r.xs, r.ids))
    k = r.cohort.state.degree
    assert k == (n - 1 if degree is None else degree) and r.cohort.state.threshold == k // 2 + 1
    assert all(len(lst.neighbours) == k for lst in r.lists.values())
    assert r.cohort.counts() == {"advertised": n, "shared": n, "u2": n, "uploaded": n, "unmasked": n}


def test_indices_follow_sorted_ids_and_the_graph_is_symmetric(tmp_path):
    ids = ["zeta", "alpha", "Mike", "b-2", "b_1", "0x", "omega", "kilo"]
    r = Round(tmp_path, 8, ids=ids, degree=4, tolerated_dropout=0.25)
    r.advertise()
    r.share()
    assert {d: r.lists[d].index for d in ids} == {d: i + 1 for i, d in enumerate(sorted(ids))}
    for d, lst in r.lists.items():
        assert all(d in [e.device_id for e in r.lists[e.device_id].neighbours] for e in lst.neighbours)
        assert lst.cohort_size == 8 and lst.modulus_bits == BITS


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("n, degree, dropped", [(10, None, 3), (12, 8, 3)])
def test_dropouts_up_to_the_tolerated_fraction_keep_the_sum_exact(tmp_path, stage, n, degree, dropped):
    r = Round(tmp_path, n, degree=degree)
    gone = r.ids[1:1 + dropped]
    total = r.run(drop={stage: gone})
    survivors = [d for d in r.ids if d not in gone] if stage != "unmask" else r.ids
    np.testing.assert_array_equal(total, expected_sum(r.xs, survivors))


@pytest.mark.parametrize("n, degree", [(10, None), (12, 8)])
def test_dropouts_spread_over_every_stage_keep_the_sum_exact(tmp_path, n, degree):
    r = Round(tmp_path, n, degree=degree)
    # one device each after advertising, after sharing (no inbox), before upload (inbox, no upload)
    total = r.run(drop={"share": ["d03"], "receive": ["d05"], "mask": ["d08"]})
    np.testing.assert_array_equal(total, expected_sum(r.xs, [d for d in r.ids if d not in ("d03", "d05", "d08")]))
    assert r.cohort.counts() == {"advertised": n, "shared": n - 1, "u2": n - 1, "uploaded": n - 3,
                                 "unmasked": n - 3}


def test_a_survivor_that_does_not_answer_unmask_is_still_counted(tmp_path):
    r = Round(tmp_path, 10)
    total = r.run(drop={"mask": ["d01"], "unmask": ["d02", "d04"]})
    np.testing.assert_array_equal(total, expected_sum(r.xs, [d for d in r.ids if d != "d01"]))


def test_too_few_advertisers_abandon_the_round(tmp_path):
    r = Round(tmp_path, 6, min_survivors=4)
    r.advertise(r.ids[:3])
    with pytest.raises(CohortAbandoned) as err:
        r.share()
    assert err.value.reason == "too_few_devices" and r.cohort.stage == "abandoned"
    with pytest.raises(CohortAbandoned):  # and stays so
        r.cohort.advertise("d05", r.devices["d05"].advertise(ROUND))


def test_a_cohort_too_small_for_the_tolerated_dropout_is_abandoned(tmp_path):
    r = Round(tmp_path, 5, tolerated_dropout=0.3)  # k = 4, t = 3: losing ⌈1.2⌉ = 2 leaves 2 < 3
    r.advertise()
    with pytest.raises(CohortAbandoned) as err:
        r.share()
    assert err.value.reason == "impossible_thresholds"


def test_too_many_dropped_before_sharing_abandon_the_round(tmp_path):
    r = Round(tmp_path, 10)  # complete, t = 5: five who shared have 4 neighbours that did
    r.advertise()
    r.share(r.ids[:5])
    with pytest.raises(CohortAbandoned) as err:
        r.receive()
    assert err.value.reason == "too_few_shared"


def test_too_many_dropped_before_upload_abandon_the_round(tmp_path):
    r = Round(tmp_path, 10, min_survivors=6)
    r.advertise()
    r.share()
    r.receive()
    r.mask(r.ids[:5])
    with pytest.raises(CohortAbandoned) as err:
        r.unmask()
    assert err.value.reason == "too_few_inputs"


def test_survivors_with_too_few_surviving_neighbours_abandon_at_close_input(tmp_path):
    r = Round(tmp_path, 10, min_survivors=3)
    r.advertise()
    r.share()
    r.receive()
    r.mask(r.ids[:5])  # each survivor has 4 surviving neighbours, t = 5
    with pytest.raises(CohortAbandoned) as err:
        r.unmask()
    assert err.value.reason == "too_few_shares"


def test_too_few_unmask_answers_abandon_the_round(tmp_path):
    r = Round(tmp_path, 10)
    r.advertise()
    r.share()
    r.receive()
    r.mask()
    r.unmask(r.ids[:4])  # t = 5
    assert not r.cohort.ready()
    with pytest.raises(CohortAbandoned) as err:
        r.cohort.result()
    assert err.value.reason == "too_few_shares"


def test_pruning_keeps_the_devices_with_t_neighbours_that_shared(tmp_path, monkeypatch):
    """U2 is the largest set whose members each have >= t neighbours in it. In a Harary graph
    (below) pruning is all or nothing, so the rule is shown on two disjoint 5-cliques (4-regular)."""
    monkeypatch.setattr(sc.graph, "neighbours",
                        lambda n, k, seed: [[j for j in range(5 * (i // 5), 5 * (i // 5) + 5) if j != i]
                                            for i in range(n)])
    r = Round(tmp_path, 10, degree=4, tolerated_dropout=0.25)  # k = 4, t = 3
    total = r.run(drop={"share": ["d05", "d06"]})  # d07..d09 keep 2 neighbours that shared
    assert sorted(r.inboxes) == ["d00", "d01", "d02", "d03", "d04"]
    np.testing.assert_array_equal(total, expected_sum(r.xs, r.ids[:5]))


def test_in_a_ring_losing_half_a_neighbourhood_cascades_to_the_whole_round(tmp_path):
    """H(k, n) with t = k/2 + 1: a device that loses k/2 neighbours is pruned, which takes one
    more neighbour from the next device along the ring, and so on around it."""
    r = Round(tmp_path, 12, degree=4, tolerated_dropout=0.25)  # k = 4, t = 3: one lost neighbour tolerated
    r.advertise()
    lists = r.cohort.close_advertising(SEED)
    gone = [e.device_id for e in lists["d00"].neighbours][:2]
    for d in r.ids:
        if d not in gone:
            r.cohort.receive_shares(d, r.devices[d].share(lists[d]))
    with pytest.raises(CohortAbandoned) as err:
        r.cohort.close_sharing()
    assert err.value.reason == "too_few_shared" and "0 of them" in err.value.message


def test_a_forged_share_among_more_than_t_makes_the_round_inconsistent(tmp_path):
    r = Round(tmp_path, 8)
    r.advertise()
    r.share()
    r.receive()
    r.mask()
    requests = r.cohort.close_input()
    for i, d in enumerate(r.ids):
        response = r.devices[d].unmask(requests[d])
        if i == 0:
            target = sorted(response.self_seed_shares)[0]
            forged = int.from_bytes(response.self_seed_shares[target], "big") ^ 1
            response = dataclasses.replace(response, self_seed_shares=response.self_seed_shares
                                           | {target: forged.to_bytes(33, "big")})
        r.cohort.receive_unmask(d, response)
    with pytest.raises(CohortAbandoned) as err:
        r.cohort.result()
    assert err.value.reason == "inconsistent_shares"


def test_answers_that_rebuild_another_mask_key_make_the_round_inconsistent(tmp_path):
    """Shares of a dropped device's key that agree with each other but rebuild a key other than the
    one it advertised (here: shares of another secret) are caught by the public-key check."""
    r = Round(tmp_path, 8)
    r.advertise()
    r.share()
    r.receive()
    r.mask([d for d in r.ids if d != "d03"])
    requests = r.cohort.close_input()
    holders = [d for d in requests if "d03" in requests[d].dropped]
    fake = shamir.split(os.urandom(32), r.cohort.state.threshold, [r.lists[d].index for d in holders])
    for d in requests:
        response = r.devices[d].unmask(requests[d])
        response = dataclasses.replace(response, mask_key_shares={"d03": fake[r.lists[d].index]})
        r.cohort.receive_unmask(d, response)
    assert r.cohort.ready()
    with pytest.raises(CohortAbandoned) as err:
        r.cohort.result()
    assert err.value.reason == "inconsistent_shares" and "advertised" in err.value.message


# -- restarts and idempotency ---------------------------------------------------------------------


def test_participants_restarted_at_every_stage_continue_and_repeat_their_answers(tmp_path):
    r = Round(tmp_path, 7)
    r.advertise()
    first = dict(r.ads)
    r.restart()
    assert {d: r.devices[d].advertise(ROUND) for d in r.ids} == first
    r.share()
    r.restart()
    assert {d: r.devices[d].share(r.lists[d]) for d in r.ids} == r.uploads
    r.receive()
    r.restart()
    for d in r.ids:
        r.devices[d].receive(r.inboxes[d])  # the same inbox again: accepted, nothing changes
    r.mask()
    r.restart()
    for d in r.ids:
        np.testing.assert_array_equal(r.devices[d].mask(r.xs[d]), r.masked[d])
        assert not r.cohort.fold(d, r.masked[d])  # the server takes a retry as a duplicate
    r.unmask()
    r.restart()
    assert {d: r.devices[d].unmask(r.requests[d]) for d in r.ids} == r.responses
    for d in r.ids:
        r.cohort.receive_unmask(d, r.responses[d])
    np.testing.assert_array_equal(r.cohort.result(), expected_sum(r.xs, r.ids))
    np.testing.assert_array_equal(r.cohort.result(), expected_sum(r.xs, r.ids))  # again: the same


def test_state_files_are_private_and_forget_deletes_them(tmp_path):
    r = Round(tmp_path, 5, tolerated_dropout=0.2)
    r.advertise()
    r.share()
    device = r.devices["d00"]
    path = tmp_path / "d00" / f"round-{ROUND}.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "d00").st_mode) == 0o700
    assert device.rounds() == [ROUND] and device.current_round() == ROUND
    device.forget(ROUND)
    assert device.rounds() == [] and device.current_round() is None and not path.exists()
    with pytest.raises(SecAggRefused) as err:
        device.share(r.lists["d00"])
    assert err.value.code == "stage_order"


def test_every_round_gets_fresh_keys(tmp_path):
    device = SecAggParticipant(tmp_path, "d00")
    a, b = device.advertise(1), device.advertise(2)
    assert len({a.mask_key, a.share_key, b.mask_key, b.share_key}) == 4
    assert device.advertise(2) == b and device.rounds() == [1, 2] and device.current_round() == 2


def test_cohort_state_round_trips_through_json_at_every_stage(tmp_path):
    r = Round(tmp_path, 8, degree=4, tolerated_dropout=0.25)

    def reload():
        body = json.loads(json.dumps(r.cohort.to_json()))
        total = r.cohort.running_sum
        r.cohort = SecAggCohort.from_json(body, total)
        assert r.cohort.to_json() == body

    r.advertise()
    reload()
    r.share()
    reload()
    r.receive()
    r.mask(r.ids[:4])
    reload()  # mid-input: half the inputs are in the sum
    r.mask(r.ids[4:7])
    reload()
    r.unmask(r.ids[:5])
    reload()
    for d in r.ids[5:7]:
        r.cohort.receive_unmask(d, r.devices[d].unmask(r.requests[d]))
    reload()
    assert r.cohort.ready()
    np.testing.assert_array_equal(r.cohort.result(), expected_sum(r.xs, r.ids[:7]))


# -- privacy --------------------------------------------------------------------------------------


def chi_square(values: np.ndarray, top_bits: int = 4) -> float:
    bins = np.bincount((values >> np.uint32(BITS - top_bits)).astype(np.int64), minlength=1 << top_bits)
    expected = values.size / (1 << top_bits)
    return float(((bins - expected) ** 2 / expected).sum())


# chi-square, 15 degrees of freedom: P(> 50) < 1e-5 for uniform values
CHI2_15_LIMIT = 50.0


def test_a_masked_input_is_indistinguishable_from_uniform(tmp_path):
    r = Round(tmp_path, 6)
    r.xs = {d: np.full(LENGTH, i, dtype=np.uint32) for i, d in enumerate(r.ids)}  # far from uniform
    assert chi_square(r.xs["d01"]) > 10 * LENGTH
    r.advertise()
    r.share()
    r.receive()
    r.mask()
    for d in r.ids:
        assert chi_square(r.masked[d]) < CHI2_15_LIMIT
        assert np.count_nonzero(r.masked[d] == r.xs[d]) <= 3  # expected 1000 / 2^20
        assert int(r.masked[d].max()) < 1 << BITS


def test_the_server_never_holds_one_devices_input(tmp_path):
    r = Round(tmp_path, 6)
    r.xs["d02"][:] = 12345  # a recognisable input
    r.advertise()
    r.share()
    r.receive()
    seen = []
    for d in r.ids:
        r.masked[d] = r.devices[d].mask(r.xs[d])
        r.cohort.fold(d, r.masked[d])
        seen.append((json.dumps(r.cohort.to_json()), r.cohort.running_sum))
    r.unmask()
    seen.append((json.dumps(r.cohort.to_json()), r.cohort.running_sum))
    for text, total in seen:
        for d in r.ids:
            assert np.count_nonzero(total == r.xs[d]) <= 3  # no device's x, in the sum or alone
            assert base64.b64encode(r.xs[d].tobytes()).decode()[:40] not in text
            assert json.dumps(r.xs[d][:8].tolist())[1:-1] not in text
    np.testing.assert_array_equal(r.cohort.result(), expected_sum(r.xs, r.ids))


@pytest.mark.parametrize("told_survived", range(0, 7))
def test_conflicting_claims_about_one_device_never_get_t_shares_of_both_kinds(tmp_path, told_survived):
    """The server tells some of u's neighbours "u survived" and the others "u dropped": with t > k/2
    it never gathers t shares of both b_u and s_u, and no neighbour answers a second request."""
    r = Round(tmp_path, 7)  # complete: k = 6, t = 4
    r.advertise()
    r.share()
    r.receive()
    r.mask()
    victim, others = r.ids[0], r.ids[1:]
    t = r.cohort.state.threshold
    seed_shares, key_shares = {}, {}
    for i, d in enumerate(others):
        neighbours = [v for v in others if v != d]
        if i < told_survived:
            request = UnmaskRequest(ROUND, survivors=tuple([d, victim] + neighbours), dropped=())
        else:
            request = UnmaskRequest(ROUND, survivors=tuple([d] + neighbours), dropped=(victim,))
        response = r.devices[d].unmask(request)
        seed_shares.update({r.lists[d].index: s for v, s in response.self_seed_shares.items() if v == victim})
        key_shares.update({r.lists[d].index: s for v, s in response.mask_key_shares.items() if v == victim})
        flipped = UnmaskRequest(ROUND, survivors=request.dropped + tuple(x for x in request.survivors if x != victim),
                                dropped=tuple(x for x in (victim,) if x in request.survivors))
        with pytest.raises(SecAggRefused) as err:  # asked again the other way, even after a restart
            SecAggParticipant(tmp_path / d, d).unmask(flipped)
        assert err.value.code == "conflicting_request"
    assert len(seed_shares) + len(key_shares) == 6
    assert min(len(seed_shares), len(key_shares)) < t
    for shares in (seed_shares, key_shares):
        if len(shares) < t:
            with pytest.raises(shamir.ShareError):
                shamir.combine(shares, t)


# -- hostile messages to a device -----------------------------------------------------------------


@pytest.fixture
def shared(tmp_path):
    """A complete 6-device round (k = 5, t = 3) through sharing."""
    r = Round(tmp_path, 6)
    r.advertise()
    r.share()
    return r


def refused(code, call, *args):
    with pytest.raises(SecAggRefused) as err:
        call(*args)
    assert err.value.code == code, err.value
    assert code in sp.REFUSAL_CODES
    return err.value


def fresh_list(tmp_path, n=6, **changes) -> tuple[SecAggParticipant, NeighbourList, list]:
    """A device that advertised, and an honest-looking neighbour list for it from fresh keys."""
    device = SecAggParticipant(tmp_path / "me", "me")
    device.advertise(ROUND)
    pairs = [(key_agreement.KeyPair.generate(), key_agreement.KeyPair.generate()) for _ in range(n - 1)]
    entries = [NeighbourEntry(f"n{i}", i + 2, m.public, s.public) for i, (m, s) in enumerate(pairs)]
    nl = NeighbourList(round_id=ROUND, index=1, cohort_size=n, degree=n - 1, threshold=(n - 1) // 2 + 1,
                       modulus_bits=BITS, neighbours=tuple(entries))
    return device, dataclasses.replace(nl, **changes), pairs


def with_entry(nl: NeighbourList, i: int, **changes) -> NeighbourList:
    entries = list(nl.neighbours)
    entries[i] = dataclasses.replace(entries[i], **changes)
    return dataclasses.replace(nl, neighbours=tuple(entries))


def test_a_fresh_neighbour_list_is_accepted(tmp_path):
    device, nl, _ = fresh_list(tmp_path)
    upload = device.share(nl)
    assert set(upload.boxes) == {e.device_id for e in nl.neighbours}


def test_share_refusals(tmp_path):
    device, nl, _ = fresh_list(tmp_path)
    own = device.advertise(ROUND)
    refused("round_mismatch", device.share, dataclasses.replace(nl, round_id=ROUND + 1))
    refused("self_in_neighbours", device.share, with_entry(nl, 0, device_id="me"))
    refused("self_in_neighbours", device.share, with_entry(nl, 0, index=1))
    refused("duplicate_neighbour", device.share, with_entry(nl, 0, device_id="n1"))
    refused("duplicate_neighbour", device.share, with_entry(nl, 0, index=3))
    refused("bad_index", device.share, with_entry(nl, 0, index=7))
    refused("bad_index", device.share, dataclasses.replace(nl, index=9))
    refused("duplicate_key", device.share, with_entry(nl, 0, mask_key=nl.neighbours[1].share_key))
    refused("duplicate_key", device.share, with_entry(nl, 0, share_key=nl.neighbours[0].mask_key))
    refused("duplicate_key", device.share, with_entry(nl, 2, mask_key=own.mask_key))
    refused("duplicate_key", device.share, with_entry(nl, 2, share_key=own.share_key))
    refused("bad_key", device.share, with_entry(nl, 3, share_key=bytes(32)))  # a low-order point
    refused("bad_key", device.share, with_entry(nl, 3, mask_key=(1).to_bytes(32, "little")))
    refused("bad_threshold", device.share, dataclasses.replace(nl, threshold=2))  # t = k/2 is not > k/2
    refused("bad_threshold", device.share, dataclasses.replace(nl, threshold=6))
    refused("bad_threshold", device.share, dataclasses.replace(nl, degree=4))
    refused("bad_threshold", device.share, dataclasses.replace(nl, modulus_bits=33))
    refused("bad_threshold", device.share, dataclasses.replace(nl, modulus_bits=0))
    refused("bad_threshold", device.share, dataclasses.replace(nl, neighbours=(), degree=0, threshold=0))
    # nothing written by any refusal: the honest list is still accepted
    upload = device.share(nl)
    assert device.share(nl) == upload
    refused("conflicting_request", device.share, dataclasses.replace(nl, threshold=4))


def test_a_small_cohort_size_is_refused(tmp_path):
    device, nl, _ = fresh_list(tmp_path)
    refused("bad_index", device.share, dataclasses.replace(nl, cohort_size=5))


def test_share_before_advertising_is_out_of_order(tmp_path):
    device = SecAggParticipant(tmp_path / "me", "me")
    _, nl, _ = fresh_list(tmp_path / "other")
    refused("stage_order", device.share, nl)


def test_a_neighbour_key_from_an_earlier_round_is_refused(tmp_path):
    device, nl, pairs = fresh_list(tmp_path)
    device.share(nl)
    device.advertise(ROUND + 1)
    _, later, _ = fresh_list(tmp_path / "other")
    later = dataclasses.replace(later, round_id=ROUND + 1)
    refused("reused_key", device.share, with_entry(later, 1, mask_key=nl.neighbours[4].mask_key))
    own_old = SecAggParticipant(tmp_path / "me", "me")  # a restarted process knows it too
    refused("reused_key", own_old.share, with_entry(later, 2, share_key=nl.neighbours[0].share_key))
    assert own_old.share(later).round_id == ROUND + 1


def test_the_key_history_keeps_64_rounds(tmp_path):
    device, nl, _ = fresh_list(tmp_path)
    device.share(nl)
    old_key = nl.neighbours[0].mask_key
    for round_id in range(ROUND + 1, ROUND + 65):
        device.advertise(round_id)
        _, other, _ = fresh_list(tmp_path / f"o{round_id}", round_id=round_id)
        device.share(other)
        device.forget(round_id)
    device.advertise(1000)
    _, last, _ = fresh_list(tmp_path / "last", round_id=1000)
    device.share(with_entry(last, 0, mask_key=old_key))  # 65 rounds ago: forgotten


def test_receive_refusals(shared, tmp_path):
    r = shared
    me, other = "d00", "d01"
    device = r.devices[me]
    r.inboxes = r.cohort.close_sharing()
    inbox = r.inboxes[me]
    refused("round_mismatch", device.receive, dataclasses.replace(inbox, round_id=ROUND + 1))
    # a box addressed to another recipient (d02's box for d01, put in d00's inbox as from d02)
    misrouted = inbox.boxes | {"d02": r.uploads["d02"].boxes[other]}
    refused("bad_share_box", device.receive, ShareInbox(ROUND, misrouted))
    # a box from a device that is not a neighbour
    refused("bad_share_box", device.receive, ShareInbox(ROUND, inbox.boxes | {"stranger": inbox.boxes["d02"]}))
    # a box from another sender, relabelled
    refused("bad_share_box", device.receive, ShareInbox(ROUND, inbox.boxes | {"d03": inbox.boxes["d02"]}))
    tampered = bytearray(inbox.boxes["d04"])
    tampered[-1] ^= 1
    refused("bad_share_box", device.receive, ShareInbox(ROUND, inbox.boxes | {"d04": bytes(tampered)}))
    refused("too_few_neighbours", device.receive, ShareInbox(ROUND, {v: inbox.boxes[v] for v in ("d01", "d02")}))
    refused("stage_order", device.mask, r.xs[me])  # nothing was kept by any refusal
    device.receive(inbox)
    device.receive(inbox)
    fewer = ShareInbox(ROUND, {v: inbox.boxes[v] for v in ("d01", "d02", "d03")})
    refused("conflicting_request", device.receive, fewer)


def test_a_box_replayed_from_another_round_is_refused(tmp_path):
    first = Round(tmp_path, 6, round_id=ROUND)
    first.run()
    second = Round(tmp_path, 6, round_id=ROUND + 1)  # same devices, same folders
    second.advertise()
    second.share()
    inbox = second.cohort.close_sharing()["d00"]
    old = first.inboxes["d00"].boxes["d03"]
    refused("bad_share_box", second.devices["d00"].receive, ShareInbox(ROUND + 1, inbox.boxes | {"d03": old}))
    refused("round_mismatch", second.devices["d00"].receive, first.inboxes["d00"])
    second.devices["d00"].receive(inbox)


def test_receive_before_sharing_is_out_of_order(tmp_path):
    device = SecAggParticipant(tmp_path, "d00")
    device.advertise(ROUND)
    refused("stage_order", device.receive, ShareInbox(ROUND, {}))


def test_mask_refusals(shared):
    r = shared
    r.receive()
    device, x = r.devices["d00"], r.xs["d00"]
    y = device.mask(x)
    np.testing.assert_array_equal(device.mask(x.copy()), y)
    refused("conflicting_request", device.mask, x ^ np.uint32(1))
    refused("conflicting_request", device.mask, x[:-1])
    with pytest.raises(ValueError):
        device.mask(x.astype(np.int64))
    with pytest.raises(ValueError):
        device.mask(np.full(LENGTH, 1 << BITS, dtype=np.uint32))


@pytest.fixture
def masked(shared):
    shared.receive()
    shared.mask()
    return shared


def test_unmask_refusals(masked):
    r = masked
    me = "d00"
    device = r.devices[me]
    honest = UnmaskRequest(ROUND, survivors=("d00", "d01", "d02", "d03"), dropped=("d04", "d05"))
    refused("round_mismatch", device.unmask, dataclasses.replace(honest, round_id=ROUND + 1))
    refused("both_shares_requested", device.unmask,
            UnmaskRequest(ROUND, survivors=("d00", "d01", "d02", "d03", "d04"), dropped=("d04", "d05")))
    refused("self_not_survivor", device.unmask, UnmaskRequest(ROUND, survivors=("d01", "d02", "d03"),
                                                              dropped=("d04", "d05")))
    refused("self_not_survivor", device.unmask, UnmaskRequest(ROUND, survivors=("d01", "d02", "d03", "d04"),
                                                              dropped=("d00", "d05")))
    refused("not_a_neighbour", device.unmask, UnmaskRequest(ROUND, survivors=honest.survivors + ("d99",),
                                                            dropped=honest.dropped))
    refused("incomplete_request", device.unmask, UnmaskRequest(ROUND, survivors=honest.survivors, dropped=("d04",)))
    refused("too_few_survivors", device.unmask, UnmaskRequest(ROUND, survivors=("d00", "d01", "d02"),
                                                              dropped=("d03", "d04", "d05")))
    answer = device.unmask(honest)
    assert set(answer.self_seed_shares) == {"d01", "d02", "d03"} and set(answer.mask_key_shares) == {"d04", "d05"}
    reordered = UnmaskRequest(ROUND, survivors=tuple(reversed(honest.survivors)), dropped=honest.dropped)
    assert device.unmask(reordered) == answer  # the same sets: the same answer
    refused("conflicting_request", device.unmask,
            UnmaskRequest(ROUND, survivors=("d00", "d01", "d02", "d03", "d04"), dropped=("d05",)))
    refused("conflicting_request", SecAggParticipant(r.root / me, me).unmask,
            UnmaskRequest(ROUND, survivors=("d00", "d01", "d02", "d03", "d04", "d05"), dropped=()))


def test_unmask_before_masking_is_out_of_order(shared):
    shared.receive()
    refused("stage_order", shared.devices["d00"].unmask,
            UnmaskRequest(ROUND, survivors=tuple(shared.ids), dropped=()))


def test_a_corrupt_state_file_is_reported(tmp_path):
    device = SecAggParticipant(tmp_path, "d00")
    device.advertise(ROUND)
    (tmp_path / f"round-{ROUND}.json").write_text("{not json")
    refused("state_unreadable", device.advertise, ROUND)


# -- hostile messages to the server ---------------------------------------------------------------


def rejected(code, call, *args):
    with pytest.raises(SecAggRejected) as err:
        call(*args)
    assert err.value.code == code, err.value
    return err.value


def test_advertisement_rejections(tmp_path):
    cohort = SecAggCohort(ROUND, vector_length=LENGTH, modulus_bits=BITS, min_survivors=2, tolerated_dropout=0,
                          seen_keys={key_hash(b"\x09" * 32)})
    ad = SecAggParticipant(tmp_path / "a", "a").advertise(ROUND)
    other = SecAggParticipant(tmp_path / "b", "b").advertise(ROUND)
    before = cohort.to_json()
    rejected("round_mismatch", cohort.advertise, "a", dataclasses.replace(ad, round_id=ROUND + 1))
    rejected("bad_device_id", cohort.advertise, "a b", ad)
    rejected("bad_device_id", cohort.advertise, "x" * 129, ad)
    rejected("bad_key", cohort.advertise, "a", dataclasses.replace(ad, mask_key=bytes(32)))
    rejected("reused_key", cohort.advertise, "a", dataclasses.replace(ad, share_key=b"\x09" * 32))
    rejected("duplicate_key", cohort.advertise, "a", dataclasses.replace(ad, share_key=ad.mask_key))
    assert cohort.to_json() == before
    cohort.advertise("a", ad)
    cohort.advertise("a", ad)  # a retry
    rejected("conflicting_advertisement", cohort.advertise, "a", other)
    rejected("duplicate_key", cohort.advertise, "b", dataclasses.replace(other, mask_key=ad.share_key))
    cohort.advertise("b", other)
    assert cohort.counts()["advertised"] == 2
    assert cohort.key_hashes() == {key_hash(k) for k in (ad.mask_key, ad.share_key, other.mask_key, other.share_key)}
    cohort.close_advertising(SEED)
    rejected("wrong_stage", cohort.advertise, "c", SecAggParticipant(tmp_path / "c", "c").advertise(ROUND))


def test_a_full_cohort_refuses_more_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "MAX_COHORT", 2)
    cohort = SecAggCohort(ROUND, vector_length=LENGTH, modulus_bits=BITS, min_survivors=2)
    for d in ("a", "b"):
        cohort.advertise(d, SecAggParticipant(tmp_path / d, d).advertise(ROUND))
    rejected("cohort_full", cohort.advertise, "c", SecAggParticipant(tmp_path / "c", "c").advertise(ROUND))


def test_a_key_of_an_earlier_round_is_refused_by_the_next_cohort(tmp_path):
    r = Round(tmp_path, 5, tolerated_dropout=0.2)
    r.advertise()
    later = SecAggCohort(ROUND + 1, vector_length=LENGTH, modulus_bits=BITS, min_survivors=2,
                         seen_keys=r.cohort.key_hashes())
    rejected("reused_key", later.advertise, "d00", dataclasses.replace(r.ads["d00"], round_id=ROUND + 1))


def test_share_upload_rejections(shared):
    r = shared
    cohort = SecAggCohort(ROUND, vector_length=LENGTH, modulus_bits=BITS, min_survivors=3)
    for d in r.ids:
        cohort.advertise(d, r.ads[d])
    rejected("wrong_stage", cohort.receive_shares, "d00", r.uploads["d00"])
    cohort.close_advertising(SEED)
    up = r.uploads["d00"]
    before = cohort.to_json()
    rejected("not_in_cohort", cohort.receive_shares, "d99", up)
    rejected("round_mismatch", cohort.receive_shares, "d00", dataclasses.replace(up, round_id=ROUND + 1))
    rejected("wrong_recipients", cohort.receive_shares, "d00", ShareUpload(ROUND, dict(list(up.boxes.items())[:-1])))
    rejected("wrong_recipients", cohort.receive_shares, "d00", ShareUpload(ROUND, up.boxes | {"d00": up.boxes["d01"]}))
    rejected("bad_box", cohort.receive_shares, "d00", ShareUpload(ROUND, up.boxes | {"d01": up.boxes["d01"] + b"x"}))
    assert cohort.to_json() == before
    cohort.receive_shares("d00", up)
    cohort.receive_shares("d00", up)
    other = ShareUpload(ROUND, up.boxes | {"d01": up.boxes["d02"]})
    rejected("conflicting_upload", cohort.receive_shares, "d00", other)
    assert cohort.counts()["shared"] == 1


def test_fold_rejections(shared):
    r = shared
    r.inboxes = r.cohort.close_sharing()
    cohort = r.cohort
    y = np.zeros(LENGTH, dtype=np.uint32)
    before = (cohort.to_json(), cohort.running_sum)
    rejected("not_in_cohort", cohort.fold, "d99", y)
    rejected("length_mismatch", cohort.fold, "d00", y[:-1])
    rejected("bad_input", cohort.fold, "d00", y.astype(np.int64))
    rejected("bad_input", cohort.fold, "d00", y.reshape(10, -1))
    rejected("bad_input", cohort.fold, "d00", y + np.uint32(1 << BITS))
    assert cohort.to_json() == before[0] and (cohort.running_sum == before[1]).all()
    assert cohort.fold("d00", y + np.uint32(5))
    assert not cohort.fold("d00", y + np.uint32(5))
    rejected("conflicting_input", cohort.fold, "d00", y)
    rejected("wrong_stage", cohort.receive_unmask, "d00", UnmaskResponse(ROUND, {}, {}))


def test_unmask_response_rejections(masked):
    r = masked
    requests = r.cohort.close_input()
    answer = r.devices["d00"].unmask(requests["d00"])
    cohort = r.cohort
    rejected("wrong_stage", cohort.fold, "d01", r.masked["d01"])
    rejected("not_in_cohort", cohort.receive_unmask, "d99", answer)
    rejected("round_mismatch", cohort.receive_unmask, "d00", dataclasses.replace(answer, round_id=ROUND + 1))
    swapped = UnmaskResponse(ROUND, self_seed_shares=dict(list(answer.self_seed_shares.items())[1:]),
                             mask_key_shares=dict(list(answer.self_seed_shares.items())[:1]))
    rejected("wrong_shares", cohort.receive_unmask, "d00", swapped)
    rejected("wrong_shares", cohort.receive_unmask, "d00", UnmaskResponse(ROUND, {}, {}))
    big = answer.self_seed_shares | {"d01": (shamir.PRIME + 1).to_bytes(33, "big")}
    rejected("bad_share", cohort.receive_unmask, "d00", dataclasses.replace(answer, self_seed_shares=big))
    cohort.receive_unmask("d00", answer)
    cohort.receive_unmask("d00", answer)
    other = answer.self_seed_shares | {"d01": bytes(33)}
    rejected("conflicting_response", cohort.receive_unmask, "d00", dataclasses.replace(answer, self_seed_shares=other))
    assert cohort.counts()["unmasked"] == 1


def test_the_cohort_checks_its_parameters():
    for bad in (dict(modulus_bits=0), dict(modulus_bits=33), dict(min_survivors=1), dict(vector_length=0),
                dict(tolerated_dropout=0.5), dict(degree=0)):
        with pytest.raises(ValueError):
            SecAggCohort(ROUND, **(dict(vector_length=LENGTH, modulus_bits=BITS, min_survivors=2) | bad))


# -- messages -------------------------------------------------------------------------------------

KEY = bytes(range(1, 33))
SHARE = bytes(range(33))
MESSAGES = [
    KeyAdvertisement(ROUND, KEY, KEY[::-1]),
    NeighbourList(ROUND, 1, 3, 2, 2, BITS, (NeighbourEntry("a", 2, KEY, KEY[::-1]), NeighbourEntry("b", 3, KEY, KEY))),
    ShareUpload(ROUND, {"a": b"box-a", "b": b"box-b"}),
    ShareInbox(ROUND, {"a": b"box"}),
    UnmaskRequest(ROUND, ("me", "a"), ("b",)),
    UnmaskResponse(ROUND, {"a": SHARE}, {"b": SHARE[::-1]}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip_through_json(message):
    body = json.loads(json.dumps(message.to_json()))
    assert type(message).from_json(body) == message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("parse, body, match", [
    (KeyAdvertisement.from_json, {"round_id": 1, "mask_key": b64(KEY)}, "missing field 'share_key'"),
    (KeyAdvertisement.from_json, {"round_id": -1, "mask_key": b64(KEY), "share_key": b64(KEY)}, "round_id"),
    (KeyAdvertisement.from_json, {"round_id": True, "mask_key": b64(KEY), "share_key": b64(KEY)}, "must be int"),
    (KeyAdvertisement.from_json, {"round_id": 1, "mask_key": b64(KEY[:31]), "share_key": b64(KEY)}, "32 bytes"),
    (KeyAdvertisement.from_json, {"round_id": 1, "mask_key": b64(KEY) + "AAAA", "share_key": b64(KEY)}, "longer"),
    (KeyAdvertisement.from_json, {"round_id": 1, "mask_key": b64(KEY)[:-1] + "\n", "share_key": b64(KEY)},
     "not standard base64"),
    (KeyAdvertisement.from_json, {"round_id": 1, "mask_key": b64(KEY).replace("=", ""), "share_key": b64(KEY)},
     "not standard base64"),
    (KeyAdvertisement.from_json, {"round_id": 1, "mask_key": b64(KEY)[:-2] + "B=", "share_key": b64(KEY)},
     "canonical"),
    (NeighbourEntry.from_json, {"device_id": "a", "index": 0, "mask_key": b64(KEY), "share_key": b64(KEY)}, "index"),
    (NeighbourEntry.from_json, {"device_id": "é", "index": 1, "mask_key": b64(KEY), "share_key": b64(KEY)},
     "printable ASCII"),
    (NeighbourEntry.from_json, {"device_id": "", "index": 1, "mask_key": b64(KEY), "share_key": b64(KEY)},
     "printable ASCII"),
    (NeighbourList.from_json, {"round_id": 1, "index": 1, "cohort_size": 2, "degree": 1, "threshold": 1,
                               "modulus_bits": 20, "neighbours": [{}] * (MAX_ENTRIES + 1)}, "at most 10000"),
    (ShareUpload.from_json, {"round_id": 1, "boxes": {"a" * 129: b64(b"x")}}, "printable ASCII"),
    (ShareUpload.from_json, {"round_id": 1, "boxes": {"a": b64(bytes(600))}}, "longer than 512"),
    (ShareUpload.from_json, {"round_id": 1, "boxes": {"a": ""}}, "1..512 bytes"),
    (ShareInbox.from_json, {"round_id": 1, "boxes": {f"d{i}": "" for i in range(MAX_ENTRIES + 1)}}, "at most"),
    (ShareInbox.from_json, {"round_id": 1, "boxes": []}, "must be dict"),
    (UnmaskRequest.from_json, {"round_id": 1, "survivors": ["a", "a"], "dropped": []}, "names a device twice"),
    (UnmaskRequest.from_json, {"round_id": 1, "survivors": ["a", 3], "dropped": []}, "printable ASCII"),
    (UnmaskResponse.from_json, {"round_id": 1, "self_seed_shares": {"a": b64(SHARE)},
                                "mask_key_shares": {"a": b64(SHARE)}}, "both kinds"),
    (UnmaskResponse.from_json, {"round_id": 1, "self_seed_shares": {"a": b64(SHARE[:32])},
                                "mask_key_shares": {}}, "33 bytes"),
])
def test_malformed_messages_are_refused(parse, body, match):
    with pytest.raises(ProtocolError, match=match):
        parse(body)


def test_messages_built_in_process_are_checked_too():
    with pytest.raises(ProtocolError):
        KeyAdvertisement(ROUND, KEY[:5], KEY)
    with pytest.raises(ProtocolError):
        UnmaskRequest(ROUND, ("a", "a"), ())
    with pytest.raises(ProtocolError):
        NeighbourEntry("a", 0, KEY, KEY)


def test_refusal_codes_are_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "secure_aggregation.md").read_text()
    for code in sp.REFUSAL_CODES:
        assert f"`{code}`" in doc, code
    for code in sc.REJECTION_CODES + sc.ABANDON_REASONS:
        assert f"`{code}`" in doc, code
