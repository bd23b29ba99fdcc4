"""The Flask application factory: `create_app(config)` builds one aggregation server.

No module-level app exists (see Flask's tutorial factory): tests build as many servers as they
like, each on its own state directory. The factory prepares the state directory (database, first
model version), registers one blueprint per concern, the single JSON error handler, the security
headers (`aggregator.headers`) and the metrics registry, and starts the background worker that
folds, closes and publishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

from flask import Flask

from aggregator import db, logs
from aggregator.config import AggregatorConfig, ConfigError, load_config
from aggregator.errors import register_error_handlers
from aggregator.headers import add_security_headers
from aggregator.limits import update_size_limit
from aggregator.metrics import Metrics
from aggregator.model_store import ModelStore
from aggregator.privacy import start_problem
from aggregator.worker import Worker
from fedkb_core.manifest import load_manifest

log = logging.getLogger(__name__)

MODELS_DIR = "models"


@dataclasses.dataclass
class ServerState:
    """What the routes share: config, model store, metrics, the worker, a jitter source, and the
    group commit that request threads write through (`db.GroupCommit`)."""

    config: AggregatorConfig
    store: ModelStore
    metrics: Metrics
    worker: Worker
    rng: random.Random
    commits: db.GroupCommit


def create_app(config: AggregatorConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the server.

    Args:
        config: an `AggregatorConfig`; or a mapping of overrides applied on top of the defaults
            and `FEDKB_*` environment variables (tests pass `{"testing": True, "state_dir": ...}`);
            or None for defaults + environment only.

    Raises:
        ConfigError: invalid settings, missing secrets outside testing, or a state directory with
            no model and no `init_model` to start from.
        fedkb_core.manifest.ManifestError: the initial model folder is not a valid export.
    """
    if not isinstance(config, AggregatorConfig):
        config = load_config(overrides=config)
    logs.configure(json_lines=config.log_json)

    app = Flask(__name__)
    app.config.update(TESTING=config.testing, JSON_SORT_KEYS=False)
    store = ModelStore(config.state_dir / MODELS_DIR)
    _initialize_state(config, store)

    metrics = Metrics(config.state_dir, config)
    worker = Worker(config, store)
    app.extensions["fedkb"] = ServerState(config=config, store=store, metrics=metrics, worker=worker,
                                          rng=random.Random(), commits=db.GroupCommit(config.state_dir))

    # Uploads are bounded per round in their route, before reading; this is the backstop for
    # every other body.
    app.config["MAX_CONTENT_LENGTH"] = _largest_body(config, store)

    register_error_handlers(app)
    app.after_request(add_security_headers)
    db.init_app(app)
    from aggregator.routes import enrollment, models, operators, secagg, training

    for module in (enrollment, models, training, secagg, operators):
        app.register_blueprint(module.bp)

    if config.background_worker:
        worker.start()
    log.info("server ready", extra={"state_dir": str(config.state_dir), "pid": os.getpid(),
                                    "config": config.public_json()})
    return app


@contextlib.contextmanager
def _init_lock(state_dir: Path):
    """Serialize first-time setup between gunicorn workers starting together."""
    with open(state_dir / "init.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prepare_state(config: AggregatorConfig) -> None:
    """Create the state directory, its database and first model version if missing (idempotent).

    Raises:
        ConfigError: the state holds no model and `init_model` is unset, or its rounds already
            spent the target ε.
        fedkb_core.manifest.ManifestError: the initial model folder is not a valid export.
    """
    _initialize_state(config, ModelStore(config.state_dir / MODELS_DIR))


def _initialize_state(config: AggregatorConfig, store: ModelStore) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    db.init_db(config.state_dir)
    with _init_lock(config.state_dir):
        conn = db.connect(config.state_dir)
        try:
            problem = start_problem(conn, config)
            if problem is not None:
                raise ConfigError(problem)
            latest = db.latest_version(conn)
            if latest is not None:
                if config.init_model is not None:
                    log.info("state already has a model; --init-model ignored",
                             extra={"model_version": latest, "init_model": str(config.init_model)})
                return
            if config.init_model is None:
                raise ConfigError(f"{config.state_dir} holds no model yet: pass --init-model MODEL_DIR "
                                  "(a folder written by `fedkb export`)")
            manifest = load_manifest(config.init_model)
            if config.device_batch_size is not None and config.device_batch_size != manifest.batch_size:
                raise ConfigError(f"device_batch_size {config.device_batch_size} differs from the model's static "
                                  f"batch size {manifest.batch_size}")
            leftover = store.version_dir(manifest.version)
            if leftover.exists():  # an import cut short before its row was written
                shutil.rmtree(leftover)
            store.import_initial(config.init_model)
            with db.transaction(conn):
                db.add_version(conn, version=manifest.version, parent_version=manifest.parent_version, round_id=None)
            log.info("initial model imported", extra={"model_version": manifest.version,
                                                      "init_model": str(config.init_model)})
        finally:
            conn.close()


def _largest_body(config: AggregatorConfig, store: ModelStore) -> int:
    conn = db.connect(config.state_dir)
    try:
        version = db.latest_version(conn)
    finally:
        conn.close()
    params = sum(w.size for w in store.manifest(version).weights)
    return update_size_limit(config, params)
