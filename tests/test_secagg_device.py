"""Secure aggregation on the device: the edge runtime's `Device` (and the real `fedkb device` CLI)
against a real `fedkb serve --secure-aggregation`, every stage over HTTP (docs/secure_aggregation.md,
"Over HTTP").

A round of three phones publishes: each advertises its keys right after its check-in, then steps
the round once per cycle (share, train + encode + mask + upload, unmask, done) and forgets its
secrets. One phone is the `fedkb device --once` CLI, a new process for every cycle; another is a
new `Device` object over the same home between stages; a third dies between masking its input and
keeping the masked body: all continue from their folders (the last masks the same kept input again,
which the participant accepts, where a second input would be refused). A phone
whose limits lack `secagg` refuses the task and sends nothing; a neighbour list the participant
refuses makes the phone leave the round, logged with the code, uploading nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from edge_runtime.device import CycleReport, Device, DeviceConfig, next_delay
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.secagg_participant import SecAggParticipant
from fedkb_core.secagg.messages import NeighbourEntry
from tests.fixtures_aggregator import SECRET, ServeProcess, status, wait_for
from tests.fixtures_edge import edge_model, state, text_file, user_lines  # noqa: F401
from tests.test_edge_device_e2e import ALL_MET, fedkb_device, reports

PHONES = 3


class Killed(BaseException):
    """Stands for the process dying mid-step (nothing after it runs)."""


def _serve(edge_model, tmp_path, goal: int = PHONES) -> ServeProcess:
    # Three phones, all of whom must survive (tolerated dropout 0: with k = 2 neighbours and t = 2,
    # a larger tolerance makes the thresholds impossible, graph.thresholds).
    return ServeProcess(tmp_path / "state", edge_model, "--secure-aggregation", "--goal-clients", str(goal),
                        "--min-clients", str(goal), "--over-selection", "1.0", "--secagg-tolerated-dropout", "0",
                        "--round-timeout", "600", "--retry-after", "1", log=tmp_path / "serve.log")


def _device(url: str, home, text_file) -> Device:
    device = Device(DeviceConfig(server_url=url, home=home, suggestions=False), state=ScriptedDeviceState(state()))
    device.ensure_enrolled(SECRET)
    if device.examples.count() == 0:
        device.import_text(text_file)
    return device


def _secagg_files(home) -> list[str]:
    folder = home / "secagg"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_round_of_three_phones_publishes_and_a_restarted_phone_continues(edge_model, text_file, tmp_path):
    server = _serve(edge_model, tmp_path)
    homes = [tmp_path / f"phone{i}" for i in range(PHONES)]
    devices = {0: _device(server.url, homes[0], text_file), 1: _device(server.url, homes[1], text_file)}
    actions: dict[int, list[dict]] = {i: [] for i in range(PHONES)}

    def cycle(i: int) -> dict:
        if i == 2:  # the CLI: a new process every cycle
            (report,) = reports(fedkb_device(server.url, homes[2], "--state", ALL_MET, "--once", "--format", "json",
                                             text=text_file if not actions[2] else None))
        else:
            try:
                report = devices[i].run_once().to_json()
            except Killed:  # the process died: a new one over the same home takes over
                devices.pop(i).close()
                devices[i] = _device(server.url, homes[i], text_file)
                report = {"action": "killed"}
        actions[i].append(report)
        return report

    def killed_after_masking(task, body, up_to):  # phone 1 dies between masking and keeping the body
        raise Killed()

    devices[1]._keep_in_outbox = killed_after_masking

    try:
        for i in range(PHONES):  # the check-in's cycle advertises
            report = cycle(i)
            assert report["action"] == "secagg_advertised", report
            assert report["round_id"] == 1 and 1.0 <= report["retry_after"] <= 6 * 3600
        assert all((home / "secagg" / "task-1.json").is_file() for home in homes)
        assert (homes[0] / "secagg").stat().st_mode & 0o777 == 0o700
        assert (homes[0] / "secagg" / "round-1.json").stat().st_mode & 0o777 == 0o600
        for _ in range(12):
            for i in range(PHONES):
                if actions[i][-1]["action"] != "secagg_done":
                    report = cycle(i)
                    assert report["action"] in ("secagg_wait", "secagg_shared", "accepted", "secagg_unmasked",
                                                "secagg_done", "killed"), report
                    assert next_delay(CycleReport(**{**report, "reasons": tuple(report.get("reasons", ()))}),
                                      60.0) <= 6 * 3600
            if 0 in devices and any(r["action"] == "secagg_shared" for r in actions[0]):
                devices.pop(0).close()  # phone 0's process ends between stages; a new one takes over
                devices[0] = _device(server.url, homes[0], text_file)
            if all(actions[i][-1]["action"] == "secagg_done" for i in range(PHONES)):
                break
        assert [r["action"] for r in actions[1]].count("killed") == 1
        for i in range(PHONES):
            done = [r["action"] for r in actions[i] if r["action"] not in ("secagg_wait", "killed")]
            assert done == ["secagg_advertised", "secagg_shared", "accepted", "secagg_unmasked", "secagg_done"], \
                (i, actions[i])
            upload = next(r for r in actions[i] if r["action"] == "accepted")
            assert upload["stage"] == "input" and upload["secagg_ms"] > 0
            assert upload.get("encode_ms", 0) > 0 or i == 1  # phone 1 encoded before it died: the kept input
            assert upload["num_examples"] > 0 and upload["steps"] > 0
            assert all(r["secagg_ms"] > 0 for r in actions[i] if r["action"] in ("secagg_advertised",
                                                                                 "secagg_shared", "secagg_unmasked"))
            # Forgotten: no keys, shares, task or input left; the key history stays.
            assert _secagg_files(homes[i]) == ["left.json", "seen-keys.json"], _secagg_files(homes[i])
            assert not list((homes[i] / "outbox").glob("*")) if (homes[i] / "outbox").exists() else True
        wait_for(lambda: status(server.url)["model_version"] == 2, timeout=30, what="version 2")
        (v2,) = [v for v in status(server.url)["versions"] if v["version"] == 2]
        assert v2["num_clients"] == PHONES, v2
    finally:
        for device in devices.values():
            device.close()
        server.stop()


def test_a_phone_whose_limits_lack_secagg_refuses_and_sends_nothing(edge_model, text_file, tmp_path):
    server = _serve(edge_model, tmp_path)
    try:
        limits = tmp_path / "limits.json"
        limits.write_text(json.dumps({"encodings": ["float32", "float16", "hadamard"]}))
        home = tmp_path / "phone"
        out = fedkb_device(server.url, home, "--state", ALL_MET, "--once", "--format", "json", "--limits",
                           str(limits), text=text_file)
        (report,) = reports(out)
        assert report["action"] == "refused" and report["reasons"] == ["task_out_of_bounds"], report
        assert "encoding 'secagg' is not one of float32, float16, hadamard" in report["message"]
        assert "encoding 'secagg'" in out.stderr  # and logged
        assert not (home / "secagg").exists()  # no keys drawn, none advertised
        s = status(server.url)
        assert s["totals"]["accepted"] == 0 and s["round"]["assigned"] == 1
    finally:
        server.stop()


def test_a_neighbour_list_the_participant_refuses_makes_the_phone_leave_the_round(edge_model, text_file, tmp_path,
                                                                                 caplog):
    server = _serve(edge_model, tmp_path)
    devices = [_device(server.url, tmp_path / f"phone{i}", text_file) for i in range(PHONES)]
    try:
        for device in devices:
            assert device.run_once().action == "secagg_advertised"
        victim = devices[0]
        real_status = victim.client.secagg_status

        def forged(round_id):  # a server that lists the phone as its own neighbour
            answer = real_status(round_id)
            if answer.action != "share":
                return answer
            me = SecAggParticipant(victim.home / "secagg", victim.device_id).advertise(round_id)
            entry = NeighbourEntry(victim.device_id, answer.neighbours.index, me.mask_key, me.share_key)
            neighbours = dataclasses.replace(answer.neighbours,
                                             neighbours=(entry,) + answer.neighbours.neighbours[1:])
            return dataclasses.replace(answer, neighbours=neighbours)

        victim.client.secagg_status = forged
        sent = victim.client.traffic.bytes_sent
        with caplog.at_level(logging.WARNING, logger="edge_runtime"):
            for _ in range(20):
                report = victim.run_once()
                if report.action != "secagg_wait":
                    break
        assert report.action == "secagg_refused" and report.reasons == ("self_in_neighbours",), report
        assert "self_in_neighbours" in caplog.text
        assert victim.client.traffic.bytes_sent == sent  # nothing sent after the refusal (a GET has no body)
        assert _secagg_files(victim.home) == ["left.json"], "the round's keys are forgotten"
        # The phone holds no round now: its next cycle is a check-in, whose task (the server hands a
        # task again until it is reported) it does not take up again with fresh keys.
        again = victim.run_once()
        assert again.action == "secagg_dropped" and again.reasons == ("left_round",), again
        assert next_delay(again, 60.0) == 60.0 and _secagg_files(victim.home) == ["left.json"]
        assert status(server.url)["totals"]["accepted"] == 0
    finally:
        for device in devices:
            device.close()
        server.stop()


def test_the_device_loop_comes_back_after_the_rounds_retry_after():
    for action in ("secagg_advertised", "secagg_wait", "secagg_shared", "secagg_unmasked"):
        assert next_delay(CycleReport(action, retry_after=2.5), 60.0) == 2.5
    assert next_delay(CycleReport("secagg_done"), 60.0) == 1.0
    assert next_delay(CycleReport("secagg_dropped", ("too_few_shares",)), 60.0) == 1.0
    assert next_delay(CycleReport("secagg_refused", ("bad_share_box",)), 60.0) == 60.0


def test_the_grid_flattens_weights_in_the_servers_order():
    from edge_runtime.secagg_job import flatten
    from fedkb_core.wire import WeightSpec, split_by_name

    deltas = {"b": np.arange(3, dtype=np.float32), "a": np.arange(4, dtype=np.float32).reshape(2, 2) + 10}
    specs = [WeightSpec("b", (3,)), WeightSpec("a", (2, 2))]
    back = split_by_name(flatten(deltas), specs)
    for name in deltas:
        np.testing.assert_array_equal(back[name], deltas[name])
