"""One secure-aggregation round of the emulated fleet: every phone runs every stage.

Each emulated phone is the edge runtime's own `Device`, with its own SecAgg participant folder
in its home (`edge_runtime.secagg_job`), so all it knows between stages is on its disk. The pool
of worker processes cannot hold a device blocked on a stage barrier, so the fleet drives the
stages in phases, each a step of each phone's cycle (`Device.secagg_step`):

(a) selection (`fleet._select`): each eligible phone checks in and, given a task, advertises its
    keys at once (`Device.run_task`), until the server says the round is full;
(b) sharing (`share`): every phone that advertised takes one step: its status says `share`, it
    posts its boxes (in the fleet's process: a few ms of X25519, Shamir and AES-GCM per phone);
(c) input (`input`): in the worker pool, each phone that shared takes the step that opens its
    inbox, trains with LiteRT under the scheduler on the simulated clock (dropouts as in any
    round), encodes, masks and uploads (`DeviceJob(secagg=True)`);
(d) unmasking (`unmask`): every phone whose masked update counted takes one step: it posts its
    shares;
(e) after the round is published or abandoned (`finish`): every phone still holding the round
    takes one more step (`done` or `dropped`: it forgets the round's secrets).

A stage closes by itself once every device that could act has acted. When some could not (a
phone that dropped out, refused, or came too late), the fleet ends the stage early with the
operator's end-round call, as it ends plain rounds once its devices are done, then waits for the
round to leave that stage; it never ends a stage it has not seen (the stage is read first), so it
cannot close the next one by accident.

`counts()` is the round's `secagg` entry in report.json: phones at each stage (`selected`,
`advertised`, `shared`, `uploaded`, `unmasked`, and `done`: those still holding the round when it
ended, told so by their last step), `dropped` per stage (the phones that
completed the previous stage but not this one), refusals by code, the reason the round was
abandoned (null if it was not), `grid` as the server recorded it (`modulus_bits`, `calibration`: the
fixed grid of a first round, `blocks_left_out`: the tuned grid's overflowing blocks; added by
simulation.fleet), and `cpu_ms` per stage {total, mean, max} over the phones (thread
CPU time in secure aggregation's own work: `keys` (drawing two X25519 key pairs), `shares`
(sharing and sealing), `encode` (the update onto the grid), `mask` (opening the inbox and
masking), `unmask`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edge_runtime.client import ServerUnavailable
from edge_runtime.device import CycleReport, Device
from edge_runtime.secagg_job import ADVERTISED, DONE, DROPPED, REFUSED, SHARED, UNMASKED, WAIT
from fedkb_core.errors import FedkbError
from fedkb_core.protocol import RoundTask

log = logging.getLogger(__name__)

STAGES = ("advertising", "sharing", "input", "unmasking", "finished", "abandoned")
STAGE_WAIT_SECONDS = 120.0  # how long the fleet waits for a stage it ended to close
COUNTED = ("accepted", "duplicate")


def _stats(values: list[float]) -> dict:
    return {"total": round(sum(values), 3), "mean": round(sum(values) / len(values), 3) if values else 0.0,
            "max": round(max(values, default=0.0), 3)}


@dataclasses.dataclass(eq=False)  # hashed by identity: one per phone
class _Member:
    """One selected phone's part in the round."""

    key: Any  # the fleet's handle of the phone (its index)
    device: Device
    task: RoundTask
    reports: list[CycleReport] = dataclasses.field(default_factory=list)
    advertised: bool = False
    shared: bool = False
    uploaded: bool = False
    unmasked: bool = False
    done: bool = False
    refused: str | None = None
    failed: str | None = None
    cpu: dict = dataclasses.field(default_factory=dict)


class SecAggRound:
    """The fleet's view of one SecAgg round, driven phase by phase (module docstring).

    Args:
        end_stage: the operator's end-round call (`ServerAccess.end_round`), which closes the
            current stage of a SecAgg round with the devices that acted.
        operator_stage: the round's stage as the operator's status shows it (None when it does not:
            a phone's status request tells it then).
    """

    def __init__(self, end_stage: Callable[[], None], operator_stage: Callable[[], str | None] = lambda: None):
        self.end_stage, self.operator_stage = end_stage, operator_stage
        self.members: dict[Any, _Member] = {}
        self.abandoned: str | None = None
        self.ended: list[str] = []  # stages the fleet ended early

    # (a) ----------------------------------------------------------------------------------
    def advertise(self, key, device: Device, task: RoundTask) -> CycleReport:
        """The selected phone's advertising step, right after its check-in."""
        member = self.members[key] = _Member(key, device, task)
        report = self._step(member, lambda: device.run_task(task))
        member.advertised = report is not None and report.action == ADVERTISED
        self._cpu(member, "keys", report)
        return report

    # (b) ----------------------------------------------------------------------------------
    def share(self) -> None:
        members = [m for m in self.members.values() if m.advertised]
        reports = self._until_past(members, "advertising")
        for member, report in reports.items():
            member.shared = report.action == SHARED
            self._cpu(member, "shares", report)
        self._settle(members, [m for m in members if m.shared], "sharing",
                     [r.stage for r in reports.values() if r.action == SHARED])

    # (c) ----------------------------------------------------------------------------------
    def input_members(self) -> list[_Member]:
        """The phones whose input step runs in the worker pool."""
        return [m for m in self.members.values() if m.shared]

    def record_input(self, key, result) -> None:
        """A worker's result (a `JobResult`, or the exception the job raised)."""
        member = self.members[key]
        if isinstance(result, Exception):
            member.failed = f"{type(result).__name__}: {result}"
            return
        member.uploaded = result.status in COUNTED
        if result.action == REFUSED:
            member.refused = result.reason
        elif not member.uploaded and result.status.startswith("failed"):
            member.failed = result.status
        if result.action == DROPPED and result.stage == "abandoned" and result.reason:
            self.abandoned = self.abandoned or result.reason
        for stage, ms in (("mask", result.secagg_ms), ("encode", result.encode_ms)):
            if ms:
                member.cpu[stage] = member.cpu.get(stage, 0.0) + ms

    # (d) ----------------------------------------------------------------------------------
    def unmask(self) -> None:
        shared = self.input_members()
        survivors = [m for m in shared if m.uploaded]
        self._settle(shared, survivors, "input", [])
        reports = self._until_past(survivors, "input")
        for member, report in reports.items():
            member.unmasked = report.action == UNMASKED
            self._cpu(member, "unmask", report)
        self._settle(survivors, [m for m in survivors if m.unmasked], "unmasking",
                     [r.stage for r in reports.values() if r.action == UNMASKED], wait=False)

    # (e) ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """Once the round has ended: every phone that still holds it learns done or dropped."""
        for member in self.members.values():
            if member.device.secagg.held_round() != member.task.round_id:
                continue
            report = self._step(member, member.device.secagg_step)
            if report is None:
                continue
            member.done = report.action == DONE
            if report.action == DROPPED and report.stage == "abandoned" and report.reasons:
                self.abandoned = self.abandoned or report.reasons[0]

    # The round's record -------------------------------------------------------------------
    def counts(self) -> dict:
        members = list(self.members.values())
        n = {name: sum(getattr(m, name) for m in members)
             for name in ("advertised", "shared", "uploaded", "unmasked", "done")}
        cpu = {stage: _stats([m.cpu[stage] for m in members if stage in m.cpu])
               for stage in ("keys", "shares", "encode", "mask", "unmask")}
        return {"selected": len(members), **n,
                "dropped": {"advertising": len(members) - n["advertised"], "sharing": n["advertised"] - n["shared"],
                            "input": n["shared"] - n["uploaded"], "unmasking": n["uploaded"] - n["unmasked"]},
                "refused": dict(Counter(m.refused for m in members if m.refused)),
                "failed": sum(m.failed is not None for m in members),
                "stages_ended_by_fleet": list(self.ended), "abandoned": self.abandoned, "cpu_ms": cpu}

    # Helpers ------------------------------------------------------------------------------
    def _step(self, member: _Member, step: Callable[[], CycleReport | None]) -> CycleReport | None:
        """One step of a phone's cycle in the fleet's process; a failure is data, not a crash."""
        try:
            report = step()
        except Exception as err:  # noqa: BLE001 — as a worker's job: a device failing is data for the report
            member.failed = f"{type(err).__name__}: {err}"
            log.warning("secure aggregation: a phone's step failed: %s", member.failed)
            return None
        if report is not None:
            member.reports.append(report)
            if report.action == REFUSED:
                member.refused = report.reasons[0] if report.reasons else "unknown"
            if report.action == DROPPED and report.stage == "abandoned" and report.reasons:
                self.abandoned = self.abandoned or report.reasons[0]
        return report

    @staticmethod
    def _cpu(member: _Member, stage: str, report: CycleReport | None) -> None:
        if report is not None and report.secagg_ms:
            member.cpu[stage] = member.cpu.get(stage, 0.0) + report.secagg_ms

    def _stage_of(self, members: list[_Member]) -> str | None:
        """The round's stage: the operator's view, else as one of `members` sees it (a status
        request, counted as that phone's traffic; the answer also says what the phone must do,
        which it then does in its next step)."""
        try:
            stage = self.operator_stage()
        except Exception as err:  # noqa: BLE001 — the operator's view is a shortcut, not a need
            log.warning("secure aggregation: no operator status: %s", err)
            stage = None
        if stage is not None:
            return stage
        for member in members:
            try:
                return member.device.client.secagg_status(member.task.round_id).stage
            except (ServerUnavailable, FedkbError) as err:
                log.warning("secure aggregation: no status for a phone: %s", err)
        return None

    def _until_past(self, members: list[_Member], stage: str) -> dict[_Member, CycleReport]:
        """One step of every phone in `members`, for the stage after `stage`. Phones told to wait
        while the round is still at `stage` have others that have not acted (they dropped out or
        refused): the fleet ends that stage and asks again."""
        reports: dict[_Member, CycleReport] = {}
        pending, deadline = list(members), time.monotonic() + STAGE_WAIT_SECONDS
        while pending:
            waiting = []
            for member in pending:
                report = self._step(member, member.device.secagg_step)
                if report is None:
                    continue
                if report.action == WAIT and report.stage == stage:
                    waiting.append(member)
                else:
                    reports[member] = report
            if not waiting:
                break
            if stage not in self.ended:
                self._end(stage)
            if time.monotonic() > deadline:
                for member in waiting:
                    member.failed = f"the round stayed at stage {stage}"
                log.warning("secure aggregation: the round stayed at stage %s for %.0f s", stage, STAGE_WAIT_SECONDS)
                break
            time.sleep(0.1)
            pending = waiting
        return reports

    def _settle(self, members: list[_Member], actors: list[_Member], stage: str, seen: list[str | None], *,
                wait: bool = True) -> None:
        """After a phase in which `actors` of `members` acted at `stage`: if the round is still there
        (as the last answer said, else as a status request says), end it when some phone did not
        act, and (`wait`) wait until the round has left it. When every phone acted the server closes
        the stage itself; it is ended only if it has not moved a few seconds later."""
        probes = actors or members
        stage_now = seen[-1] if seen and seen[-1] is not None else self._stage_of(probes)
        if stage_now != stage or self.abandoned:
            return
        if len(actors) < len(members):
            self._end(stage)
        elif not wait:
            return
        deadline, patience = time.monotonic() + STAGE_WAIT_SECONDS, time.monotonic() + 3.0
        while stage_now == stage and time.monotonic() < deadline:
            time.sleep(0.1)
            stage_now = self._stage_of(probes)
            if stage_now == stage and stage not in self.ended and time.monotonic() > patience:
                self._end(stage)
        if stage_now == stage:
            log.warning("secure aggregation: the round stayed at stage %s for %.0f s", stage, STAGE_WAIT_SECONDS)

    def _end(self, stage: str) -> None:
        log.info("secure aggregation: ending stage %s (every phone that could act has)", stage)
        self.ended.append(stage)
        self.end_stage()

