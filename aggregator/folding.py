"""Durable accept, then fold: how an accepted update survives a crash and counts exactly once.

Accepting an update (request path, any thread or gunicorn worker):
    1. validate it fully (`fedkb_core.wire.decode_update`, re-clip);
    2. write the body as received to `<state>/inbox/<round>/<device>-<rand>.safetensors` and
       fsync it (`write_blob`);
    3. in one SQLite transaction (synchronous=FULL), re-check the round is open and insert the
       `updates` row that names the blob; only then answer "accepted". Concurrent accepts share
       that transaction (`db.GroupCommit`), which fsyncs the inbox folder once for all of their
       blobs before it commits, so every committed row names a durable, complete blob.
   A crash before 3 commits leaves an orphan blob (perhaps torn) that no row names: it is never
   folded and is deleted with its round's inbox.

Folding (the single `Folder` per state directory, holder of `<state>/folder.lock`):
    1. read rows with id > last_folded_id in id order, decode and re-clip each blob, add
       n·Δ to the running float64 sum (`aggregator.fedavg`);
    2. checkpoint {sum, Σn, count, last_folded_id} atomically to `<state>/sums/<round>.safetensors`;
    3. only then delete the folded blobs.
   After `kill -9` anywhere, restart loads the checkpoint and refolds every row with a larger id;
   blobs at or below last_folded_id are never read again. Every accepted row is thus in the sum
   exactly once, and memory is O(model) whatever the number of updates.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import struct
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load

from aggregator import db, secagg_stages
from aggregator.dp import DPGaussianSum
from aggregator.fedavg import ClippedSum, WeightedSum
from aggregator.masked_sum import MaskedSum
from fedkb_core.durable import fsync_dir, remove_temps
from aggregator.model_store import save_tensors
from aggregator.rounds import RoundRecord, state_after_quarantine
from fedkb_core import hadamard
from fedkb_core.update_encoding import HADAMARD, clip_inflation
from fedkb_core.wire import UpdateRejected, WeightSpec, decode_rotated, decode_update, split_by_name

log = logging.getLogger(__name__)

INBOX_DIR = "inbox"
SUMS_DIR = "sums"
QUARANTINE_DIR = "quarantine"
UNFOLDABLE = "unfoldable"  # the rejection reason of a quarantined blob
ROTATED = "rotated"  # the one tensor of a hadamard round's sum (and of its checkpoint)
LOCK_FILE = "folder.lock"


def write_blob(state_dir: Path, round_id: int, device_id: str, body: bytes | memoryview, *,
               sync_dir: bool = True) -> Path:
    """Write an accepted body durably under a new unique name; return its path.

    The bytes are written straight from the request's buffer to their final name and fsynced;
    there is no temporary name and rename, because nothing needs the name to appear atomically:
    a blob is only ever read through the `updates` row that names it, and that row is committed
    after this function (and the folder fsync) returned. A crash mid-write leaves a torn file that
    no row names, which is never folded and goes with its round's inbox, like any orphan blob.

    Args:
        sync_dir: fsync the inbox folder too, so the new name itself is durable. The upload route
            passes False and has `db.GroupCommit` fsync the folder once for every blob of a
            commit batch, before that commit.
    """
    folder = Path(state_dir) / INBOX_DIR / str(round_id)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)
    # A unique name (O_EXCL): two racing uploads of one device never write into the same file.
    path = folder / f"{device_id}-{secrets.token_hex(8)}.safetensors"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    if sync_dir:
        fsync_dir(folder)
    return path


class FolderLock:
    """An exclusive, non-blocking `flock` on `<state>/folder.lock`, held for the process's life.

    The kernel drops it when the holder dies, even by `kill -9`, so another process (another
    gunicorn worker, or the restarted server) takes over folding.
    """

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _decoded_norm_allowance(round_: RoundRecord) -> float:
    """How far above the clip norm the server re-clips a decoded update of a round without DP.

    Stochastic rounding adds unbiased noise that lengthens an update the device clipped to C;
    re-clipping that at C would shrink every clipped update and bias the mean (by ~4x at 1 bit).
    Without DP the server's clip only bounds a hostile device's influence, so it allows the
    quantizer's own inflation (`clip_inflation`, 1.0005 at 8 bits). With DP the clip is the
    sensitivity the noise is calibrated to and stays at C (docs/architecture.md, "Compressed updates").
    """
    if round_.encoding == HADAMARD and round_.update_bits is not None:
        return clip_inflation(round_.update_bits)
    return 1.0


class RoundSum:
    """A round's running sum plus the id of the last update folded into it.

    A differentially private round (`round_.dp_enabled`) sums unit-weight updates into a
    `DPGaussianSum` (aggregator/dp.py) and counts `unclipped`, the updates whose norm was at most
    the clip norm (adaptive clipping's count); both are checkpointed like the sum.

    A `hadamard` round sums in the rotated domain (`rotated`): one vector of the padded length,
    to which each update is added as decoded but not rotated back (`decode_rotated`); rotation is
    linear and orthogonal, so clipping there is clipping in the weights' domain, and
    `in_weight_layout` rotates the sum back once when the round closes. That saves the inverse
    rotation per update, which costs more than the whole float32 fold (bench/bench_compression.py).
    """

    def __init__(self, round_: RoundRecord, specs: list[WeightSpec], *, total: WeightedSum | None = None,
                 last_folded_id: int = 0, unclipped: int = 0, rotated: bool | None = None):
        self.round_ = round_
        self.round_id = round_.id
        self.specs = specs
        self.rotated = round_.encoding == HADAMARD if rotated is None else rotated
        length = sum(s.size for s in specs)
        # Name order: the order safetensors stores float32 tensors in, so a blob's data is one
        # vector in the sum's layout (`Folder._flat_float32`).
        layout = ({ROTATED: (hadamard.padded_length(length),)} if self.rotated
                  else {s.name: s.shape for s in sorted(specs, key=lambda s: s.name)})
        self.total = total or WeightedSum(layout)
        if round_.dp_enabled:
            self.clipped = DPGaussianSum(self.total, clip_norm=round_.clip_norm,
                                         noise_multiplier=round_.dp_update_noise_multiplier,
                                         denominator=round_.dp_denominator)
        else:
            self.clipped = ClippedSum(self.total, round_.clip_norm * _decoded_norm_allowance(round_))
        self.last_folded_id = last_folded_id
        self.unclipped = unclipped

    @property
    def count(self) -> int:
        """Updates folded."""
        return self.total.count

    @property
    def total_examples(self) -> int:
        return self.total.total_examples

    def tensors(self) -> dict[str, np.ndarray]:
        """What the checkpoint stores: the float64 sum by name (`rotated` for a hadamard round)."""
        return self.total.weighted_sum

    def in_weight_layout(self) -> "RoundSum":
        """This sum by weight name: itself, or for a rotated sum Rᵀ·Σ (float64) with its counters."""
        if not self.rotated:
            return self
        length = sum(s.size for s in self.specs)
        flat = hadamard.unrotate(self.total.flat.reshape(-1, hadamard.BLOCK), self.round_.rotation_seed, length)
        total = WeightedSum.restore(split_by_name(flat, self.specs), total_examples=self.total.total_examples,
                                    count=self.total.count)
        return RoundSum(self.round_, self.specs, total=total, last_folded_id=self.last_folded_id,
                        unclipped=self.unclipped, rotated=False)

    def count_norm(self, measured: float, reported: float | None) -> None:
        """Count the update as unclipped if its norm before any clipping was at most C.

        The device clipped already and reports its norm before that (`device_norm`); the server
        re-measures what arrived. The larger of the two is the norm before clipping (a device that
        did not clip shows its true norm to the server), so an update counts as unclipped only if
        both say it fitted.
        """
        norm = max(measured, reported or 0.0)
        if norm <= self.clipped.clip_norm:
            self.unclipped += 1


class Folder:
    """Folds accepted blobs of the active round into its checkpointed running sum."""

    def __init__(self, state_dir: Path, *, checkpoint_interval: float = 1.0, batch: int = 64):
        self.state_dir = Path(state_dir)
        self.sums_dir = self.state_dir / SUMS_DIR
        self.inbox_dir = self.state_dir / INBOX_DIR
        self.checkpoint_interval = checkpoint_interval
        self.batch = batch
        self._current: RoundSum | None = None
        self._pending_delete: list[Path] = []
        self._last_checkpoint = 0.0
        self.fold_seconds = 0.0  # time spent decoding and adding, for the round's aggregate_seconds
        self._buffer = bytearray()  # one blob at a time is read into this (O(model), reused)

    def checkpoint_path(self, round_id: int) -> Path:
        return self.sums_dir / f"{round_id}.safetensors"

    def load(self, round_: RoundRecord, specs: list[WeightSpec]) -> RoundSum | MaskedSum:
        """The round's sum: cached, else from its checkpoint, else empty (a SecAgg round's is a
        `MaskedSum`, aggregator/masked_sum.py)."""
        if self._current is not None and self._current.round_id == round_.id:
            return self._current
        self._pending_delete.clear()
        self.fold_seconds = 0.0
        path = self.checkpoint_path(round_.id)
        if path.is_file():
            raw = path.read_bytes()
            from fedkb_core.wire import read_header

            _, meta, _ = read_header(raw)
            arrays = dict(sorted(st_load(raw).items()))  # name order, as `RoundSum` lays a new sum out
            if round_.secure:
                current = MaskedSum.restore(round_, self._vector_length(round_, specs), arrays,
                                            count=int(meta["count"]), last_folded_id=int(meta["last_folded_id"]))
            else:
                total = WeightedSum.restore(arrays, total_examples=int(meta["total_examples"]),
                                            count=int(meta["count"]))
                current = RoundSum(round_, specs, total=total, last_folded_id=int(meta["last_folded_id"]),
                                   unclipped=int(meta.get("unclipped", 0)))
            self.fold_seconds = float(meta.get("fold_seconds", 0.0))
            log.info("resumed round sum", extra={"round_id": round_.id, "folded": current.count,
                                                  "last_folded_id": current.last_folded_id})
        elif round_.secure:
            current = MaskedSum(round_, self._vector_length(round_, specs))
        else:
            current = RoundSum(round_, specs)
        self._current = current
        # Blobs at or below the checkpoint's id were folded before a crash cut their deletion short.
        self._delete_folded_leftovers(current)
        return current

    @staticmethod
    def _vector_length(round_: RoundRecord, specs: list[WeightSpec]) -> int:
        return round_.secagg_grid(sum(s.size for s in specs)).vector_length

    def _delete_folded_leftovers(self, current: RoundSum | MaskedSum) -> None:
        conn = db.connect(self.state_dir)
        try:
            rows = conn.execute("SELECT blob FROM updates WHERE round_id = ? AND id <= ?",
                                (current.round_id, current.last_folded_id)).fetchall()
        finally:
            conn.close()
        for row in rows:
            (self.state_dir / row["blob"]).unlink(missing_ok=True)

    def fold_pending(self, conn, round_: RoundRecord, specs: list[WeightSpec], *, force_checkpoint: bool = False) -> int:
        """Fold every accepted, not yet folded update of the round; return how many were folded.

        Checkpoints at most every `checkpoint_interval` seconds (and always when forced or when
        the round is no longer open), then deletes the blobs the checkpoint covers. The interval
        is also kept while new updates keep arriving as fast as they are folded, so the blobs on
        disk and the work a restart would redo stay bounded by one interval's worth.
        """
        current = self.load(round_, specs)
        folded = 0
        while True:
            if self._pending_delete and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
                self.checkpoint(conn)
            rows = db.updates_after(conn, round_.id, current.last_folded_id, self.batch)
            if not rows:
                break
            for row in rows:
                start = time.perf_counter()
                path = self.state_dir / row["blob"]
                try:
                    norm = self._add_blob(current, path, specs, row["num_examples"])
                except (UpdateRejected, ValueError, FileNotFoundError) as err:
                    self._quarantine(conn, row, path, err)
                    continue
                current.count_norm(norm, row["device_norm"])
                current.last_folded_id = int(row["id"])
                self._pending_delete.append(path)
                self.fold_seconds += time.perf_counter() - start
                folded += 1
        if self._pending_delete and (force_checkpoint or time.monotonic() - self._last_checkpoint >= self.checkpoint_interval):
            self.checkpoint(conn)
        return folded

    def _add_blob(self, current: RoundSum | MaskedSum, path: Path, specs: list[WeightSpec],
                  num_examples: int) -> float | None:
        """Add one accepted blob to the sum; return its norm before the server's clipping (None for
        a masked input, which has none the server can see). Nothing is added if it raises.

        Raises:
            UpdateRejected, ValueError, FileNotFoundError: the blob is gone or no longer decodes
                (damaged on disk since it was accepted).
        """
        raw = self._read_blob(path)
        if isinstance(current, MaskedSum):
            current.add(bytes(raw))
            return None
        if current.rotated:
            return current.clipped.add_flat(decode_rotated(bytes(raw), specs).values, num_examples)
        values = self._flat_float32(raw, specs, current.total.layout)
        try:
            if values is None:
                raise ValueError("not the float32 layout of the sum")
            return current.clipped.add_flat(values, num_examples)
        except ValueError:  # decode_update decodes any other encoding, or says what is wrong
            update = decode_update(bytes(raw), specs, max_examples=None)
            return current.clipped.add(update.deltas, num_examples)

    def _quarantine(self, conn, row, path: Path, err: Exception) -> None:
        """Set aside an accepted blob that no longer folds, so its round goes on without it.

        It was valid when accepted, so the disk changed under it. Raising would stop the round for
        good: every pass would meet the same blob. Instead the blob moves to
        `<state>/quarantine/<round>/` (kept for the operator), and one transaction drops its row,
        counts it as rejected (`unfoldable`) and takes it off the round's accepted count, which
        reopens a round it had closed (`rounds.state_after_quarantine`). The move comes first: a
        crash before the commit leaves a row without a blob, which the next pass quarantines again.
        """
        round_id = int(row["round_id"])
        folder = self.state_dir / QUARANTINE_DIR / str(round_id)
        folder.mkdir(parents=True, exist_ok=True)
        kept = folder / f"{int(row['id'])}-{path.name}"
        try:
            os.replace(path, kept)
            fsync_dir(folder)
            fsync_dir(path.parent)
        except FileNotFoundError:
            kept = None  # gone already (or moved before a crash)
        with db.transaction(conn):
            fresh = db.get_round(conn, round_id)
            db.drop_update(conn, int(row["id"]))
            db.count_rejection(conn, round_id, UNFOLDABLE, int(row["bytes"]))
            if fresh.secure:  # the cohort decides: input open, the device did not upload; later, no sum
                db.update_round(conn, round_id, accepted=max(0, fresh.accepted - 1))
                secagg_stages.input_lost(conn, fresh, row["device_id"], time.time())
            else:
                state = state_after_quarantine(fresh)
                reopened = {"outcome": None} if state != fresh.state else {}  # the close is decided anew
                db.update_round(conn, round_id, accepted=max(0, fresh.accepted - 1), state=state, **reopened)
        if path in self._pending_delete:
            self._pending_delete.remove(path)
        log.error("accepted update no longer folds: quarantined",
                  extra={"round_id": round_id, "update_id": int(row["id"]), "device_id": row["device_id"],
                         "reason": UNFOLDABLE, "error": f"{type(err).__name__}: {err}"[:500],
                         "kept": str(kept) if kept else None})

    def _read_blob(self, path: Path) -> memoryview:
        """The blob's bytes, read into a buffer reused from blob to blob (valid until the next call)."""
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if len(self._buffer) < size:
                self._buffer = bytearray(size)
            view = memoryview(self._buffer)[:size]
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        return view[:got]

    @staticmethod
    def _flat_float32(raw: memoryview, specs: list[WeightSpec],
                      layout: dict[str, tuple[int, int]]) -> np.ndarray | None:
        """All of a blob's values as one float32 view in the sum's `layout`, or None if not laid out so.

        The blob passed `fedkb_core.wire.decode_update` (names, shapes, dtypes, finite values, example
        count) before it was accepted, and it is immutable since. A float32 update written by
        safetensors stores its tensors back to back in name order, which is the order of the
        sum's layout (`RoundSum`), so its data is one vector the sum adds in two numpy calls, with
        no copy and no allocation (the request path already paid for both). The finiteness check
        comes back with the clipping norm (`ClippedSum.add_flat`). Any other encoding or layout
        (None) goes through `decode_update` again.
        """
        try:
            if len(raw) < 8:
                return None
            (n,) = struct.unpack_from("<Q", raw)
            if 8 + n > len(raw):
                return None
            header = json.loads(bytes(raw[8: 8 + n]))
            meta = header.pop("__metadata__", None) or {}
            if meta.get("encoding") != "float32" or set(header) != set(layout) or len(specs) != len(layout):
                return None
            total = 0
            for spec in specs:
                info, (offset, size) = header[spec.name], layout[spec.name]
                if (info["dtype"] != "F32" or tuple(info["shape"]) != spec.shape or size != spec.size
                        or list(info["data_offsets"]) != [4 * offset, 4 * (offset + size)]):
                    return None
                total += size
            base = 8 + n
            if base + 4 * total > len(raw):
                return None
            return np.frombuffer(raw, np.float32, count=total, offset=base)
        except (ValueError, TypeError, KeyError, AttributeError, struct.error):
            return None

    def checkpoint(self, conn) -> None:
        """Write the sum atomically, record progress in SQLite, then delete the folded blobs."""
        current = self._current
        if current is None:
            return
        self.sums_dir.mkdir(exist_ok=True)
        meta = {"round_id": str(current.round_id), "last_folded_id": str(current.last_folded_id),
                "total_examples": str(current.total_examples), "count": str(current.count),
                "fold_seconds": repr(self.fold_seconds), "unclipped": str(current.unclipped)}
        save_tensors(self.checkpoint_path(current.round_id), current.tensors(), metadata=meta)
        self._last_checkpoint = time.monotonic()
        db.update_round(conn, current.round_id, folded=current.count, total_examples=current.total_examples)
        for path in self._pending_delete:
            path.unlink(missing_ok=True)
        self._pending_delete.clear()

    def current(self, round_id: int) -> RoundSum | MaskedSum | None:
        return self._current if self._current is not None and self._current.round_id == round_id else None

    def discard(self, round_id: int) -> None:
        """Forget a finished round: its checkpoint and inbox go."""
        if self._current is not None and self._current.round_id == round_id:
            self._current = None
            self._pending_delete.clear()
        self.checkpoint_path(round_id).unlink(missing_ok=True)
        shutil.rmtree(self.inbox_dir / str(round_id), ignore_errors=True)

    def remove_stale(self, active_round_id: int | None) -> None:
        """Delete checkpoints and inboxes of rounds that are no longer active (crash leftovers, or a
        SecAgg round a request abandoned), and forget the sum of such a round."""
        if self._current is not None and self._current.round_id != active_round_id:
            self._current = None
            self._pending_delete.clear()
        for path in list(self.sums_dir.glob("*.safetensors")) if self.sums_dir.is_dir() else []:
            if path.stem != str(active_round_id):
                path.unlink(missing_ok=True)
        for path in list(self.inbox_dir.iterdir()) if self.inbox_dir.is_dir() else []:
            if path.name != str(active_round_id):
                shutil.rmtree(path, ignore_errors=True)
        remove_temps(self.sums_dir)
