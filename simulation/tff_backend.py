"""TensorFlow Federated as the reference implementation of the same training.

Same Keras model, same initial weights, same clients and client data (windows, example caps and
batch order), client SGD, weighted FedAvg with update clipping through `tff.aggregators`, and
the same evaluation. If our stack (LiteRT devices + our server) and this agree, our FedAvg and
clipping are right. TFF 0.87 leaves a C++ `worker_binary` child running; `tff_cleanup` ends it.
"""

from __future__ import annotations

import time

import numpy as np

from datasets.prepared import PreparedData
from datasets.tokenizer import BOS_ID, PAD_ID, load_tokenizer, word_start_table
from datasets.windows import Windows, iterate_batches
from model.config import ModelConfig
from model.evaluation import evaluate_weights
from model.weights import WEIGHT_NAMES, Weights, initial_weights
from simulation import tff_cleanup
from edge_runtime.eligibility import can_continue
from simulation.availability import HOUR, draw_fleet
from simulation.device_job import POLICY, client_windows
from simulation.fleet import FleetConfig
from simulation.report import Participation, RoundRecord


def client_batches(windows: Windows, *, batch_size: int, epochs: int, seed: int) -> list[Windows]:
    """Batches in the device's order, without the mask-0 padding rows (TFF counts rows as examples)."""
    batches = []
    for batch in iterate_batches(windows, batch_size=batch_size, seed=seed, epochs=epochs):
        keep = batch.mask.sum(axis=1) > 0
        batches.append(batch.take(keep))
    return batches


class _Reference:
    """The TFF process for one model config and fleet config."""

    def __init__(self, model: ModelConfig, fleet: FleetConfig, weights: Weights):
        import tensorflow as tf
        import tensorflow_federated as tff

        from model.keras_model import build_keras_model

        self.tf, self.tff, self.model = tf, tff, model

        class MaskedLoss(tf.keras.losses.Loss):
            """Masked mean token NLL; the mask is y ∉ {PAD, BOS}, exactly the windows' mask."""

            def __init__(self):
                super().__init__(reduction=tf.keras.losses.Reduction.SUM, name="masked_nll")

            def call(self, y_true, logits):
                y = tf.cast(y_true, tf.int32)
                # tf.not_equal, not `!=`: TFF traces this in a graph where `Tensor.__ne__` falls
                # back to Python identity and would make the mask the constant True.
                mask = tf.cast(tf.logical_and(tf.not_equal(y, PAD_ID), tf.not_equal(y, BOS_ID)), tf.float32)
                nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                # Per-token terms whose SUM is the masked mean: a scalar returned here gets
                # broadcast over [B, T] by Keras and summed, scaling the loss by B·T.
                return nll * mask / tf.maximum(tf.reduce_sum(mask), 1.0)

        spec = (tf.TensorSpec([None, model.seq_len], tf.int32), tf.TensorSpec([None, model.seq_len], tf.int32))

        def model_fn():
            return tff.learning.models.from_keras_model(build_keras_model(model), input_spec=spec, loss=MaskedLoss())

        probe = build_keras_model(model)
        self._order = _trainable_order(probe)
        server_momentum = fleet.server_momentum or None
        self.process = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=fleet.device_lr),
            server_optimizer_fn=(
                tff.learning.optimizers.build_adam(learning_rate=fleet.server_lr, beta_1=0.9, beta_2=0.99,
                                                   epsilon=1e-3)
                if fleet.server_optimizer == "adam" else
                tff.learning.optimizers.build_sgdm(learning_rate=fleet.server_lr, momentum=server_momentum)),
            model_aggregator=tff.aggregators.clipping_factory(fleet.clip_norm, tff.aggregators.MeanFactory()),
        )
        self.state = self.process.initialize()
        self.set_weights(weights)

    def set_weights(self, weights: Weights) -> None:
        current = self.process.get_model_weights(self.state)
        trainable = [np.asarray(weights[name], np.float32) for name in self._order]
        self.state = self.process.set_model_weights(
            self.state, self.tff.learning.models.ModelWeights(trainable=trainable,
                                                              non_trainable=list(current.non_trainable)))

    def weights(self) -> Weights:
        trainable = self.process.get_model_weights(self.state).trainable
        return {name: np.asarray(value, np.float32) for name, value in zip(self._order, trainable, strict=True)}

    def round(self, client_data: list[list[Windows]]) -> dict:
        tf = self.tf
        datasets = []
        for batches in client_data:
            # Constant tensors, batch by batch: TFF's C++ executor cannot run Python generators,
            # and re-batching a flat dataset would merge an epoch's short last batch with the next.
            dataset = tf.data.Dataset.from_tensors((batches[0].x, batches[0].y))
            for batch in batches[1:]:
                dataset = dataset.concatenate(tf.data.Dataset.from_tensors((batch.x, batch.y)))
            datasets.append(dataset)
        output = self.process.next(self.state, datasets)
        self.state = output.state
        return output.metrics


def _trainable_order(keras_model) -> list[str]:
    """Our weight names in the order of the Keras model's trainable variables."""
    from model.keras_model import _slots

    by_ref = {slot.ref(): name for name, slot in _slots(keras_model).items()}
    order = [by_ref[v.ref()] for v in keras_model.trainable_variables]
    assert sorted(order) == sorted(WEIGHT_NAMES), order
    return order


def one_round(*, model: ModelConfig, fleet: FleetConfig, weights: Weights, client_data: list[list[Windows]]) -> Weights:
    """New global weights after one TFF round from `weights` on the given clients' batches."""
    reference = _Reference(model, fleet, weights)
    reference.round(client_data)
    return reference.weights()


def run_tff(*, data: PreparedData, model: ModelConfig, config: FleetConfig, progress: bool | None = None) -> list[RoundRecord]:
    """The `--backend tff` simulation: same clients, availability and evaluation as the fleet."""
    from tqdm import tqdm

    word_start = word_start_table(load_tokenizer(data.tokenizer_path))
    rng = np.random.default_rng(config.seed)
    client_ids = sorted(rng.choice(sorted(data.train), size=config.clients, replace=False).tolist())
    fleet_test = {c: data.test[c] for c in client_ids if len(data.test[c]) > 1}
    patterns = draw_fleet(config.clients, seed=config.seed, config=config.availability)
    goal = config.clients_per_round

    def evaluate(weights):
        return (evaluate_weights(weights, data.heldout, word_start, config.eval),
                evaluate_weights(weights, fleet_test, word_start, config.eval) if fleet_test else None)

    weights = initial_weights(model)
    reference = _Reference(model, config, weights)
    sim_time = config.start_hour_utc * HOUR
    held, part = evaluate(weights)
    records = [RoundRecord(round=0, model_version=1, clients=0, eval=held, eval_participants=part, sim_time=sim_time)]
    try:
        for round_number in tqdm(range(1, config.rounds + 1), desc="rounds (tff)", unit="round",
                                 disable=None if progress is None else not progress):
            started = time.monotonic()
            eligible = [i for i in range(config.clients) if can_continue(patterns[i].state_at(sim_time, config.availability), POLICY)]
            chosen = [eligible[i] for i in rng.permutation(len(eligible))][:goal]
            client_data, examples = [], 0
            for i in chosen:
                seed = config.seed * 100_003 + round_number * 1009 + i
                windows = client_windows(data.train[client_ids[i]], seq_len=model.seq_len,
                                         max_examples=config.max_examples, seed=seed)
                if len(windows):
                    examples += len(windows)
                    client_data.append(client_batches(windows, batch_size=model.batch_size,
                                                      epochs=config.device_epochs, seed=seed))
            if client_data:
                reference.round(client_data)
            weights = reference.weights()
            seconds = time.monotonic() - started  # training only, as the fleet measures it
            held, part = evaluate(weights)
            records.append(RoundRecord(
                round=round_number, model_version=records[-1].model_version + (1 if client_data else 0),
                clients=len(client_data), eval=held, eval_participants=part,
                participation=Participation(eligible=len(eligible), selected=len(chosen), completed=len(client_data)),
                seconds=round(seconds, 2), sim_time=sim_time, examples=examples,
                steps=sum(len(batches) for batches in client_data)))
            sim_time += config.round_hours * HOUR
    finally:
        tff_cleanup.stop_tff_workers()
    return records

