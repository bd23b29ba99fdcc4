"""The device's own limits (`edge_runtime.bounds`): pure checks, every field, every edge."""

from __future__ import annotations

import dataclasses
import math

import pytest

from edge_runtime.bounds import (DownloadLimits, TaskBounds, TaskRefused, check_steps, check_task, clamp_retry_after,
                                 limits_from_json, task_problems)
from fedkb_core.errors import FedkbError
from fedkb_core.protocol import RoundTask

GOOD = RoundTask(round_id=3, model_version=2, learning_rate=0.5, epochs=1, batch_size=4, max_examples=64,
                 clip_norm=1.0, deadline=1e9, encoding="float32")


def test_a_task_within_the_bounds_has_no_problem():
    assert task_problems(GOOD, TaskBounds()) == []
    check_task(GOOD, TaskBounds())


@pytest.mark.parametrize("change, words", [
    (dict(learning_rate=0.0), "learning_rate 0.0"),
    (dict(learning_rate=math.inf), "learning_rate inf"),
    (dict(learning_rate=10.5), "learning_rate 10.5 is outside (0, 10]"),
    (dict(clip_norm=-1.0), "clip_norm -1.0"),
    (dict(clip_norm=math.nan), "clip_norm nan"),
    (dict(epochs=0), "epochs 0"),
    (dict(epochs=51), "epochs 51 is outside [1, 50]"),
    (dict(max_examples=0), "max_examples 0"),
    (dict(max_examples=100_001), "max_examples 100001"),
    (dict(batch_size=0), "batch_size 0"),
    (dict(round_id=-1), "round_id -1"),
    (dict(model_version=2 ** 63), "model_version"),
    (dict(deadline=math.inf), "deadline inf"),
    (dict(encoding="bfloat7"), "encoding 'bfloat7'"),
    (dict(encoding="int8"), "encoding 'int8'"),  # no longer an encoding
    (dict(encoding="hadamard", update_bits=9, rotation_seed=1), "update bits must be an integer in 1..8"),
    (dict(encoding="hadamard", update_bits=0, rotation_seed=1), "update bits must be an integer in 1..8"),
    (dict(encoding="hadamard", update_bits=4), "hadamard needs a rotation seed"),
    (dict(encoding="hadamard", update_bits=4, rotation_seed=-1), "hadamard needs a rotation seed"),
    (dict(update_bits=4), "update bits apply to the hadamard and secagg encodings only"),
])
def test_each_field_outside_its_bound_is_named(change, words):
    task = dataclasses.replace(GOOD, **change)
    with pytest.raises(TaskRefused, match="task refused") as caught:
        check_task(task, TaskBounds())
    assert words in str(caught.value)
    assert caught.value.code == "task_out_of_bounds"


def test_steps_count_epochs_times_batches_on_the_windows_there_are():
    bounds = TaskBounds(max_steps=10)
    assert check_steps(dataclasses.replace(GOOD, epochs=2), 20, bounds) == 10  # 2 × ceil(20 / 4)
    with pytest.raises(TaskRefused, match="12 steps, more than the 10"):
        check_steps(dataclasses.replace(GOOD, epochs=2), 21, bounds)
    assert check_steps(dataclasses.replace(GOOD, epochs=2, max_examples=8), 1000, bounds) == 4  # sampled down first


@pytest.mark.parametrize("asked, given", [(-5.0, 1.0), (0.0, 1.0), (30.0, 30.0), (1e300, 21600.0),
                                          (math.inf, 21600.0), (math.nan, 1.0), (None, 1.0)])
def test_retry_after_is_clamped(asked, given):
    assert clamp_retry_after(asked, TaskBounds()) == given


def test_limits_come_from_one_flat_json_object():
    downloads, task = limits_from_json({"max_file_bytes": 1024, "max_epochs": 3, "encodings": ["float16"]})
    assert (downloads.max_file_bytes, downloads.max_json_bytes) == (1024, DownloadLimits().max_json_bytes)
    assert (task.max_epochs, task.encodings) == (3, ("float16",))
    for body, words in [({"max_fiel_bytes": 1}, "unknown keys ['max_fiel_bytes']"),
                        ({"max_file_bytes": -1}, "max_file_bytes must be a non-negative integer"),
                        ({"max_epochs": 0}, "max_epochs must be a positive integer"),
                        ({"min_retry_after": 9, "max_retry_after": 1}, "must not exceed"),
                        ({"encodings": ["bf16"]}, "encodings must be"),
                        ([], "expected a JSON object")]:
        with pytest.raises(FedkbError, match="limits"):
            try:
                limits_from_json(body)
            except FedkbError as err:
                assert words in str(err), (body, err)
                raise
