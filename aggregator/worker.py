"""The background worker: one per state directory, it folds, closes, publishes and opens rounds.

Every server process runs a `Worker` thread, but only the holder of the folder lock acts, so
several gunicorn workers share one state directory safely and the lock passes on when its holder
dies. Each pass (`run_once`):

    1. make sure a round is active (open one at the latest version if none is);
    2. apply the deadline: an open round past it closes if it has `min_clients` updates, else is
       abandoned;
    3. fold the accepted updates of the active round into its running sum;
    4. a closing round whose updates are all folded gets its new weights (server optimizer step
       on the weighted mean), which are published as version v+1; then the next round opens.

Crash recovery is the same code: a restarted worker finds the closing round, loads the checkpoint,
folds what is left and publishes. Publishing is idempotent: a version folder left behind by a
crash before its database row was written is removed and written again from the same inputs.

A secure-aggregation round (docs/secure_aggregation.md) has no deadline outcome of its own: its
stages close (aggregator/secagg_stages.py) on each pass that finds one due, the folder sums its
masked inputs modulo 2^r, and at its close the cohort's answers unmask the sum, which is decoded and
released as any round's (aggregator/secagg_release.py); a sum that cannot be unmasked or decoded
abandons the round.

A differentially private round (aggregator/dp.py) is released with noise from a seed committed to
the database before the draw and deleted in the transaction that records the version, so a crash
anywhere in between republishes the same noise, never a second draw.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time

from aggregator import db, dp_ftrl_release, secagg_release, secagg_stages, secagg_store
from aggregator.adaptive_clipping import next_clip_norm, unclipped_fraction
from aggregator.dp import COUNT_NOISE, UPDATE_NOISE, new_noise_seed, noise_generator
from aggregator.fedavg import ADAM_STEP, ServerStep, adam_step, server_step
from aggregator.folding import Folder, FolderLock
from aggregator.model_store import ModelStore
from aggregator.privacy import budget
from aggregator.publish import publish_version
from aggregator.rounds import ABANDONED, CLOSED, CLOSING, OPEN, RoundRecord, deadline_outcome, round_settings
from aggregator.secagg_cohort import CohortAbandoned
from fedkb_core.secagg.integer_encoding import MASK_BITS, MEASURED_ROUNDS

log = logging.getLogger(__name__)

# Test hook, for the crash test only: with this variable set to 1, the server SIGKILLs its own
# process group right after drawing a private round's noise, before publishing it.
CRASH_AFTER_NOISE = "FEDKB_TEST_CRASH_AFTER_NOISE"


def _crash_after_noise_if_asked() -> None:
    if os.environ.get(CRASH_AFTER_NOISE) == "1":
        # Test hook (tests/test_dp_crash.py): die like a power cut between the draw and the publication.
        log.warning("test hook %s: killing the server after drawing the noise", CRASH_AFTER_NOISE)
        os.killpg(os.getpgid(0), signal.SIGKILL)


MAX_RETRY_DELAY = 30.0  # seconds: a failing pass is retried at least this often


def retry_delay(failures: int, interval: float, cap: float = MAX_RETRY_DELAY) -> float:
    """Seconds before the next pass after `failures` failed ones in a row: the idle interval,
    doubled with each further failure, at most `cap`."""
    return min(cap, interval * 2.0 ** (failures - 1))


class Worker:
    """Folds, closes, publishes and opens rounds for one state directory (see module doc)."""

    def __init__(self, config, store: ModelStore, *, on_round_end=None):
        self.config = config
        self.store = store
        self.lock = FolderLock(config.state_dir)
        self.folder = Folder(config.state_dir, checkpoint_interval=config.checkpoint_interval)
        self.on_round_end = on_round_end  # callback(round, outcome, seconds) for metrics
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._started_cleanup = False
        self.last_error: str | None = None
        self._budget_logged = False  # the spent privacy budget is logged once, not every pass

    # Thread control.

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fedkb-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.lock.release()

    def wake(self) -> None:
        """Ask for a pass now (an upload arrived, a round may be complete)."""
        self._wake.set()

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as err:  # keep the worker alive; a later pass retries
                failures += 1
                self.last_error = f"{type(err).__name__}: {err}"
                delay = retry_delay(failures, self.config.worker_interval)
                if failures == 1:
                    log.exception("worker pass failed; retrying in %.1f s", delay)
                else:
                    log.error("worker pass failed %d times in a row (%s); retrying in %.1f s", failures,
                              self.last_error, delay)
                # Uploads do not cut the wait short: a failing disk or database is not retried per request.
                self._stop.wait(delay)
                continue
            if failures:
                log.info("worker pass succeeded after %d failures", failures)
                failures, self.last_error = 0, None
            if not busy:
                self._wake.wait(self.config.worker_interval)
                self._wake.clear()

    # One pass.

    def run_once(self, now: float | None = None) -> bool:
        """Do one pass if this process holds the folder lock; return True if it did work."""
        if not self.lock.try_acquire():
            return False
        conn = db.connect(self.config.state_dir)
        try:
            if not self._started_cleanup:
                self.store.remove_partial()
                active = db.active_round(conn)
                self.folder.remove_stale(active.id if active else None)
                self._started_cleanup = True
            return self._pass(conn, time.time() if now is None else now)
        finally:
            conn.close()

    def _pass(self, conn, now: float) -> bool:
        round_ = db.active_round(conn)
        if round_ is None:
            self.folder.remove_stale(None)  # a SecAgg round a request abandoned leaves its sum and inbox
            return self._open_round(conn, now) is not None

        # Deadline (a SecAgg round's: its stages').
        if round_.secure:
            if secagg_stages.due(conn, round_.id, now):
                with db.transaction(conn):
                    closed = secagg_stages.advance(conn, round_.id, now)
                round_ = db.get_round(conn, round_.id)
                if closed:
                    log.info("secure aggregation stage closed", extra={"round_id": round_.id, "stages": closed,
                                                                       "round_state": round_.state})
                if round_.state == ABANDONED:
                    return self._abandoned(conn, round_, now)
            outcome = None
        else:
            outcome = deadline_outcome(round_, now)
        if outcome is not None:
            with db.transaction(conn):
                fresh = db.get_round(conn, round_.id)
                outcome = deadline_outcome(fresh, now)
                if outcome == ABANDONED:
                    db.update_round(conn, round_.id, state=ABANDONED, closed_at=now,
                                    outcome=f"deadline with {fresh.accepted} of the minimum {fresh.min_clients} updates")
                elif outcome == CLOSING:
                    db.update_round(conn, round_.id, state=CLOSING, outcome=f"deadline with {fresh.accepted} updates")
            if outcome == ABANDONED:
                self.folder.discard(round_.id)
                log.warning("round abandoned", extra={"round_id": round_.id, "accepted": fresh.accepted,
                                                      "min_clients": fresh.min_clients})
                self._notify(fresh, ABANDONED, None)
                self._open_round(conn, now)
                return True
            round_ = db.get_round(conn, round_.id)

        # Fold.
        specs = self.store.specs(round_.model_version)
        folded = self.folder.fold_pending(conn, round_, specs, force_checkpoint=round_.state == CLOSING)

        # Close and publish.
        if round_.state == CLOSING:
            current = self.folder.current(round_.id)
            round_ = db.get_round(conn, round_.id)  # accepted is final once the round is closing
            if round_.state != CLOSING:  # a quarantined blob reopened it (`rounds.state_after_quarantine`)
                return True
            if current is not None and current.count == round_.accepted:
                self._close(conn, round_)
                return True
        return folded > 0

    def _abandoned(self, conn, round_: RoundRecord, now: float) -> bool:
        """A SecAgg round ended without a sum: drop its running sum and inbox, open the next round."""
        self.folder.discard(round_.id)
        log.warning("round abandoned", extra={"round_id": round_.id, "outcome": round_.outcome})
        self._notify(round_, ABANDONED, None)
        self._open_round(conn, now)
        return True

    def _open_round(self, conn, now: float) -> RoundRecord | None:
        """Open the next round, unless its release would spend more than the target ε (then None)."""
        with db.transaction(conn):
            existing = db.active_round(conn)
            if existing is not None:
                return existing
            allowance = budget(conn, self.config)
            if not allowance.allows_a_round:
                if not self._budget_logged:
                    log.warning(allowance.message, extra={"target_epsilon": allowance.target_epsilon,
                                                          "next_round_epsilon": allowance.next_round_epsilon})
                    self._budget_logged = True
                return None
            version = db.latest_version(conn)
            manifest = self.store.manifest(version)
            length = sum(w.size for w in manifest.weights)
            settings = round_settings(self.config, model_version=version, batch_size=manifest.batch_size, now=now,
                                      previous=db.last_closed_round(conn), length=length,
                                      measured=db.last_secagg_measurements(conn, MEASURED_ROUNDS))
            round_id = db.insert_round(conn, settings)
            if settings.get("secagg_modulus_bits") is not None:  # secure aggregation: its cohort, at advertising
                grid = db.get_round(conn, round_id).secagg_grid(length)
                # Masks and sums are modulo 2^32; the body is read modulo 2^r when decoded.
                secagg_stages.open_cohort(conn, round_id, self.config, modulus_bits=MASK_BITS,
                                          vector_length=grid.vector_length, now=now)
        log.info("round opened", extra={"round_id": round_id, "model_version": version,
                                        "goal_clients": self.config.goal_clients, "clip_norm": settings["clip_norm"],
                                        "dp_noise_multiplier": settings.get("dp_noise_multiplier")})
        return db.get_round(conn, round_id)

    def _close(self, conn, round_: RoundRecord) -> None:
        start = time.perf_counter()
        current = self.folder.current(round_.id)
        parent = round_.model_version
        count, examples = current.count, current.total_examples

        # Server computation: w ← w + η·(β·v + Δ̄), Δ̄ noised once if the round is private.
        privacy, tree, measured = {}, None, {}
        outcome = round_.outcome or f"goal of {round_.goal_clients} updates reached"
        if round_.secure:
            specs = self.store.specs(parent)
            grid = round_.secagg_grid(sum(s.size for s in specs))
            try:
                decoded = self._unmask(conn, round_, current, grid)
            except CohortAbandoned as err:
                now = time.time()
                with db.transaction(conn):
                    secagg_stages.abandon(conn, round_, err.reason, err.message, now)
                    if err.block_rms is not None:  # an overflowing sum: the next round calibrates
                        db.update_round(conn, round_.id, secagg_block_rms=_per_device(err.block_rms, count),
                                        secagg_dropped_blocks=json.dumps(list(range(len(err.block_rms)))))
                self._abandoned(conn, db.get_round(conn, round_.id), now)
                return
            if self.config.secagg_tuned:  # what the next round's steps follow (a calibration round's too)
                measured = {"secagg_block_rms": _per_device(decoded.block_rms, count),
                            "secagg_dropped_blocks": json.dumps(list(decoded.dropped_blocks))}
                if decoded.dropped_blocks:
                    dropped = (f"{len(decoded.dropped_blocks)} of {len(decoded.block_rms)} blocks overflowed the "
                               f"grid and were left out ({', '.join(map(str, decoded.dropped_blocks[:8]))})")
                    outcome = f"{outcome}; {dropped}"
                    log.warning("round %d: %s", round_.id, dropped)
            if round_.dp_enabled:
                mean_delta, privacy = self._private_release(conn, round_, secagg_release.private_sum(
                    decoded, specs, round_, grid), count, decoded.unclipped)
            else:
                mean_delta = secagg_release.weighted_mean(decoded, specs)
            step = self._server_step(parent, mean_delta)
        elif round_.dp_enabled and self.config.dp_mechanism == "ftrl":
            step, tree = self._ftrl_release(conn, round_, current.in_weight_layout())
        else:
            current = current.in_weight_layout()  # a hadamard round's sum, rotated back
            if round_.dp_enabled:
                mean_delta, privacy = self._private_release(conn, round_, current.clipped, count, current.unclipped)
            else:
                mean_delta = current.total.mean()
            step = self._server_step(parent, mean_delta)
        aggregate_seconds = self.folder.fold_seconds + (time.perf_counter() - start)

        # Publishing.
        publish_start = time.perf_counter()
        new_version = db.latest_version(conn) + 1
        stale = self.store.version_dir(new_version)
        if stale.exists():  # published before a crash, but never recorded: write it again
            shutil.rmtree(stale)
        publish_version(self.store, parent=parent, version=new_version, weights=step.weights,
                        velocity=step.velocity if self._keeps_optimizer_state else None,
                        extra={"round_id": round_.id, "num_clients": count})
        publish_seconds = time.perf_counter() - publish_start

        # Record, then open the next round at the new version.
        now = time.time()
        with db.transaction(conn):
            db.add_version(conn, version=new_version, parent_version=parent, round_id=round_.id,
                           num_clients=count, total_examples=examples, publish_seconds=publish_seconds)
            db.update_round(conn, round_.id, state=CLOSED, closed_at=now, published_version=new_version,
                            folded=count, total_examples=examples,
                            aggregate_seconds=aggregate_seconds, publish_seconds=publish_seconds,
                            outcome=outcome, **privacy, **measured)
            # Released: the seed has done its work, and with it the noise could be subtracted.
            db.forget_noise_seed(conn, round_.id)
            if tree is not None:  # DP-FTRL: a finished tree's seed has no further use
                db.forget_tree_seeds_before(conn, tree.tree_index)
            if round_.secure:  # the round's keys and shares have done their work
                secagg_store.forget(conn, round_.id)
        self.folder.discard(round_.id)
        log.info("round closed", extra={"round_id": round_.id, "new_version": new_version,
                                        "clients": count, "examples": examples,
                                        "aggregate_seconds": round(aggregate_seconds, 4),
                                        "publish_seconds": round(publish_seconds, 4)})
        self._notify(db.get_round(conn, round_.id), CLOSED, publish_seconds)
        self._open_round(conn, now)

    def _private_release(self, conn, round_: RoundRecord, release, count: int,
                         unclipped: int | None) -> tuple[dict, dict]:
        """The round's noised mean delta (`release`: a `DPGaussianSum`), and (adaptive clipping) the
        next clip norm's columns from the `unclipped` count of the `count` updates.

        The seed is committed (synchronous=FULL) before any noise is drawn, and a seed already
        recorded for the round (a crash came between an earlier draw and the publication) is
        reused: whatever happens, the round is released with one noise draw only.
        """
        with db.transaction(conn):
            seed = db.keep_noise_seed(conn, round_.id, new_noise_seed())
        mean_delta = release.release(noise_generator(seed, UPDATE_NOISE))
        columns = {}
        if self.config.dp_adaptive_clipping:
            fraction = unclipped_fraction(unclipped or 0, count, expected=round_.dp_denominator,
                                          stddev=round_.dp_clipped_count_stddev or 0.0,
                                          rng=noise_generator(seed, COUNT_NOISE))
            columns = {"dp_unclipped_fraction": fraction,
                       "dp_next_clip_norm": next_clip_norm(round_.clip_norm, fraction,
                                                           target_quantile=self.config.dp_target_quantile,
                                                           learning_rate=self.config.dp_clip_learning_rate)}
        _crash_after_noise_if_asked()
        return mean_delta, columns

    def _unmask(self, conn, round_: RoundRecord, current, grid):
        """The decoded sum of the survivors' inputs: the cohort's answers remove the masks from the
        folder's running sum (aggregator/secagg_release.py).

        Raises:
            CohortAbandoned: the sum cannot be unmasked or decoded.
        """
        cohort, _ = secagg_store.load(conn, round_.id, answers=secagg_store.ALL, running_sum=current.values)
        return secagg_release.unmasked_sum(cohort, grid)

    def _ftrl_release(self, conn, round_: RoundRecord, current):
        """DP-FTRL (aggregator/dp_ftrl_release.py): the next weights from the parent's state, the
        round's clipped sum and the tree's seed, committed before any noise is drawn and reused
        after a crash, so a release is always recomputed with the same noise."""
        parent, c = round_.model_version, self.config
        state = self.store.velocity(parent)
        if state is not None and not dp_ftrl_release.has_state(state):
            log.warning("dp_mechanism ftrl: the parent version has no DP-FTRL state; starting a first tree")
            state = None
        index = dp_ftrl_release.tree_index(state)
        with db.transaction(conn):
            seed = db.keep_tree_seed(conn, index, new_noise_seed())
        weights, ftrl_state, tree = dp_ftrl_release.release(
            self.store.weights(parent), current.total.weighted_sum, state, int(seed, 16),
            noise_multiplier=round_.dp_noise_multiplier, clip_norm=round_.clip_norm, denominator=round_.dp_denominator,
            learning_rate=c.server_lr, momentum=c.server_momentum, restart_period=c.dp_tree_restart_period)
        _crash_after_noise_if_asked()
        return ServerStep(weights, ftrl_state), tree

    @property
    def _keeps_optimizer_state(self) -> bool:
        c = self.config
        return c.server_optimizer == "adam" or c.server_momentum > 0.0 or (c.dp_enabled and c.dp_mechanism == "ftrl")

    def _server_step(self, parent: int, mean_delta) -> ServerStep:
        """w ← the server optimizer's step on Δ̄; its state travels with the version (crash safe)."""
        c = self.config
        state = self.store.velocity(parent) if self._keeps_optimizer_state else None
        if state is not None and (ADAM_STEP in state) != (c.server_optimizer == "adam"):
            log.warning("server optimizer changed to %s: starting its state afresh", c.server_optimizer)
            state = None  # the parent was made by the other optimizer (settings changed at a restart)
        if c.server_optimizer == "adam":
            return adam_step(self.store.weights(parent), mean_delta, server_lr=c.server_lr, beta1=c.server_beta1,
                             beta2=c.server_beta2, epsilon=c.server_epsilon, state=state)
        return server_step(self.store.weights(parent), mean_delta, server_lr=c.server_lr,
                           momentum=c.server_momentum, velocity=state)

    def _notify(self, round_: RoundRecord, outcome: str, seconds: float | None) -> None:
        if self.on_round_end is not None:
            try:
                self.on_round_end(round_, outcome, seconds)
            except Exception:
                log.exception("round-end callback failed")


__all__ = ["Worker", "OPEN", "CLOSING"]


def _per_device(block_rms, count: int) -> str:
    """A sum's block RMS over its device count, as the JSON the rounds table keeps (`secagg_block_rms`)."""
    return json.dumps([float(x) / max(int(count), 1) for x in block_rms])
