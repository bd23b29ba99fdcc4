"""`fedkb serve`: run the aggregation server on a state directory.

Examples:
    # secrets in files (mode 0600), never on the command line: `ps` shows every argument
    fedkb serve --state runs/server --init-model runs/model --host 0.0.0.0 --port 8080 \\
        --enrollment-secret-file /etc/fedkb/enroll --admin-token-file /etc/fedkb/admin
    FEDKB_ENROLLMENT_SECRET_FILE=... FEDKB_ADMIN_TOKEN_FILE=... fedkb serve --state runs/server --workers 4

The server is gunicorn (a production WSGI server) with fedkb's own thread worker, which receives
every request whole, within --header-timeout and --body-timeout, before a thread serves it, so slow
or idle clients cannot hold the threads; `--dev` runs Werkzeug's development server instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkb_core.training_config import field_help

# (flag, field, type, help); the defaults are the config's (fedkb_core/training_config.py for the
# round, aggregation and device settings), printed in the help text. The flags themselves default
# to None, so an unset flag does not mask the config file or a FEDKB_* variable.
_TRAINING_FLAGS = (
    ("--goal-clients", "goal_clients", int, "a round closes as soon as this many updates are accepted"),
    ("--min-clients", "min_clients", int, "a round that ends with fewer updates is abandoned"),
    ("--over-selection", "over_selection", float, "tasks handed out per round = ceil(goal x this)"),
    ("--clip-norm", "clip_norm", float, "L2 norm every update is clipped to (device and server)"),
    ("--server-optimizer", "server_optimizer", str, "adam (FedAdam) or sgd (FedAvg, FedAvgM)"),
    ("--server-lr", "server_lr", float, "server learning rate"),
    ("--server-momentum", "server_momentum", float, "server momentum in [0, 1) (FedAvgM; sgd only)"),
    ("--server-beta1", "server_beta1", float, "FedAdam's first-moment decay"),
    ("--server-beta2", "server_beta2", float, "FedAdam's second-moment decay"),
    ("--server-epsilon", "server_epsilon", float, "FedAdam's epsilon (adaptivity)"),
    ("--device-lr", "device_lr", float, "learning rate of on-device SGD"),
    ("--device-epochs", "device_epochs", int, "local epochs per task"),
    ("--device-max-examples", "device_max_examples", int,
     "most training windows a device trains on per task (and may report)"),
)
# Differential privacy (docs/architecture.md, "Differential privacy"); `fedkb simulate` takes the same.
DP_FLAGS = (
    ("--dp-noise-multiplier", "dp_noise_multiplier", float,
     "Z: user-level DP-FedAvg, Gaussian noise of std Z x clip norm on each round's unweighted sum"),
    ("--dp-adaptive-clipping", "dp_adaptive_clipping", bool,
     "move the clip norm towards --dp-target-quantile of the update norms (Andrew et al., 2021)"),
    ("--dp-target-quantile", "dp_target_quantile", float, "quantile of update norms the clip norm tracks"),
    ("--dp-clip-learning-rate", "dp_clip_learning_rate", float, "geometric learning rate of the clip norm"),
    ("--dp-clipped-count-stddev", "dp_clipped_count_stddev", float, "sigma_b, noise on the clipped count"),
    ("--dp-mechanism", "dp_mechanism", str,
     "fedavg (independent noise each round) or ftrl (DP-FTRL: tree-aggregation noise, FTRL with momentum)"),
    ("--dp-min-separation", "dp_min_separation", int,
     "ftrl: fewest releases between two contributions of one device (enforced at check-in)"),
    ("--dp-tree-restart-period", "dp_tree_restart_period", int, "ftrl: restart the noise tree every this many releases"),
    ("--dp-population", "dp_population", int, "N, devices that may ever take part (for delta and epsilon)"),
    ("--dp-delta", "dp_delta", float, "delta of the (epsilon, delta) guarantee, below 1/N"),
    ("--target-epsilon", "dp_target_epsilon", float, "open no round whose release would push epsilon past this"),
)
# How devices upload (docs/architecture.md, "Compressed updates"); `fedkb simulate` takes the same.
UPDATE_FLAGS = (
    ("--update-encoding", "update_encoding", str,
     "float32 (exact), float16, or hadamard (rotation + unbiased stochastic rounding to --update-bits)"),
    ("--update-bits", "update_bits", int,
     "bits per coordinate: of a hadamard update, 1..8; under secure aggregation, 2..24: the bits of every "
     "masked value (default 8), or with DP the fixed grid's b (default 12; a value then has b + ceil(log2 cohort))"),
)
# Secure aggregation (docs/secure_aggregation.md, "Over HTTP"); `fedkb simulate` takes the same.
SECAGG_FLAGS = (
    ("--secure-aggregation", "secure_aggregation", bool,
     "every round runs SecAgg+: the server sums masked integer vectors and never sees one device's update "
     "(uploads in the secagg encoding at --update-bits)"),
    ("--secagg-tolerated-dropout", "secagg_tolerated_dropout", float,
     "fraction of its neighbours a device may lose before the round cannot unmask it, in [0, 0.5)"),
    ("--secagg-degree", "secagg_degree", int, "neighbours per device k (SecAgg+ graph)"),
    ("--secagg-stage-timeout", "secagg_stage_timeout", float,
     "seconds a SecAgg stage waits for its devices before it closes with those that acted"),
)
_SERVER_FLAGS = (
    ("--round-timeout", "round_timeout", float, "seconds from a round's opening to its deadline"),
    ("--device-batch-size", "device_batch_size", int, "must equal the model's static batch size (default: it)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest accepted upload (default: float32 update + header)"),
    ("--retry-after", "retry_after", float, "seconds a device without work waits (jittered)"),
    ("--retry-jitter", "retry_jitter", float, "retry-after is scaled by U(1-j, 1+j)"),
    ("--checkpoint-interval", "checkpoint_interval", float, "seconds between running-sum checkpoints"),
)
_CONNECTION_FLAGS = (
    ("--header-timeout", "header_timeout", float,
     "seconds a connection has to send its request line and headers (then: JSON 408, closed)"),
    ("--body-timeout", "body_timeout", float, "seconds a request has to send its body after the headers"),
    ("--max-connections", "max_connections", int,
     "open connections per worker process; further ones wait in the kernel's listen queue"),
    ("--keep-alive", "keep_alive", int, "seconds an idle kept-alive connection stays open"),
)
_FLAGS = _TRAINING_FLAGS + UPDATE_FLAGS + SECAGG_FLAGS + DP_FLAGS + _SERVER_FLAGS + _CONNECTION_FLAGS


def register(subparsers) -> None:
    import dataclasses

    from aggregator.config import AggregatorConfig
    from fedkb_core.training_config import TrainingConfig

    training = {f.name for f in dataclasses.fields(TrainingConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(AggregatorConfig)}

    def default_help(field: str) -> str:
        return field_help(field) if field in training else f"(default: {defaults[field]})"

    p = subparsers.add_parser(
        "serve", help="run the aggregation server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings are layered: built-in defaults, then --config FILE (JSON or .toml, keys as the long "
               "flag names with underscores), then FEDKB_<NAME> environment variables (e.g. FEDKB_GOAL_CLIENTS), "
               "then flags. The enrollment secret and admin token have no default: give each as a file "
               "(--enrollment-secret-file, FEDKB_ENROLLMENT_SECRET_FILE, enrollment_secret_file in the config "
               "file) or in FEDKB_ENROLLMENT_SECRET / FEDKB_ADMIN_TOKEN. Exposed to the internet, run it behind "
               "a reverse proxy that buffers requests and terminates TLS (README, 'Server operators').")
    p.add_argument("--state", required=True, type=Path, help="state directory (SQLite database, model versions)")
    p.add_argument("--init-model", type=Path, default=None,
                   help="folder written by `fedkb export`; imported as the first version of a new state directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="gunicorn worker processes sharing the state folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=8, help="request threads per worker (default: %(default)s)")
    p.add_argument("--dev", action="store_true",
                   help="Werkzeug's development server in one process instead of gunicorn (no connection "
                        "timeouts: for a laptop, never for a fleet)")
    p.add_argument("--config", type=Path, default=None, help="JSON or TOML file of settings")
    p.add_argument("--enrollment-secret-file", type=Path, default=None, metavar="PATH",
                   help="file holding the secret devices present to enroll (or FEDKB_ENROLLMENT_SECRET[_FILE])")
    p.add_argument("--admin-token-file", type=Path, default=None, metavar="PATH",
                   help="file holding the bearer token for /v1/admin/* (or FEDKB_ADMIN_TOKEN[_FILE])")
    # Deprecated: a value on the command line is visible to every user in `ps`.
    p.add_argument("--enrollment-secret", default=None, help=argparse.SUPPRESS)
    p.add_argument("--admin-token", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    for title, flags in (("rounds, aggregation and device tasks (the settings the README measured)", _TRAINING_FLAGS),
                         ("update encoding (uploads)", UPDATE_FLAGS),
                         ("secure aggregation (off unless --secure-aggregation is given)", SECAGG_FLAGS),
                         ("differential privacy (off unless --dp-noise-multiplier is given)", DP_FLAGS),
                         ("server", _SERVER_FLAGS),
                         ("connections (gunicorn; not with --dev)", _CONNECTION_FLAGS)):
        group = p.add_argument_group(title)
        for flag, field, kind, text in flags:
            if kind is bool:
                group.add_argument(flag, dest=field, action="store_true", default=None,
                                   help=f"{text} {default_help(field)}")
            else:
                group.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} {default_help(field)}")
    p.set_defaults(func=run)


def config_from_args(args, environ=None):
    """The AggregatorConfig for parsed arguments (defaults → file → environment → flags)."""
    import sys

    from aggregator.config import load_config

    overrides = {field: getattr(args, field) for _, field, _, _ in _FLAGS}
    for name in ("enrollment_secret", "admin_token"):
        if getattr(args, name) is not None:
            print(f"fedkb serve: warning: --{name.replace('_', '-')} puts the secret in every user's `ps`; "
                  f"use --{name.replace('_', '-')}-file or FEDKB_{name.upper()}", file=sys.stderr)
        overrides[name] = getattr(args, name)
        overrides[f"{name}_file"] = getattr(args, f"{name}_file")
    overrides.update(state_dir=args.state, init_model=args.init_model, log_json=False if args.plain_logs else None)
    return load_config(file=args.config, environ=environ, overrides=overrides)


def run(args) -> int:
    import logging

    from fedkb_core.errors import FedkbError

    if args.workers < 1 or args.threads < 1:
        raise FedkbError("--workers and --threads must be at least 1")
    if args.dev and args.workers > 1:
        raise FedkbError("--dev runs one process; it takes no --workers")
    config = config_from_args(args)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.dev:
        return _serve_werkzeug(config, args.host, args.port)
    return _serve_gunicorn(config, args.host, args.port, args.workers, args.threads)


def _serve_werkzeug(config, host: str, port: int) -> int:
    from werkzeug.serving import make_server

    from aggregator.app import create_app
    from aggregator.server_errors import JsonErrorRequestHandler
    from fedkb.signals import stop_on_sigterm_like_ctrl_c

    app = create_app(config)
    server = make_server(host, port, app, threaded=True, request_handler=JsonErrorRequestHandler)
    stop_on_sigterm_like_ctrl_c()  # the worker thread ends cleanly (kill -9 is safe too)
    print(f"fedkb serve: development server (Werkzeug) on http://{host}:{server.server_port} "
          f"(state {config.state_dir})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions["fedkb"].worker.stop()
        server.server_close()
    return 0


def gunicorn_settings(config, host: str, port: int, workers: int, threads: int) -> dict:
    """gunicorn's settings for this config: fedkb's buffering thread worker (which also answers
    gunicorn's own parse errors in JSON) and its limits."""
    from aggregator.gunicorn_worker import ConnectionLimits, worker_class

    limits = ConnectionLimits(header_timeout=config.header_timeout, body_timeout=config.body_timeout)
    return {"bind": f"{host}:{port}", "workers": workers, "threads": threads, "worker_class": worker_class(limits),
            "worker_connections": config.max_connections, "keepalive": config.keep_alive,
            # The master kills a worker whose heartbeat stops this long (a hung process, not a slow
            # request: the event loop beats while threads work).
            "timeout": 120, "graceful_timeout": 10, "accesslog": None,
            # gunicorn >= 25 opens a control socket in $HOME by default, shared by every instance of
            # the user; fedkb does not use it.
            "control_socket_disable": True}


def _serve_gunicorn(config, host: str, port: int, workers: int, threads: int) -> int:
    from gunicorn.app.base import BaseApplication

    from aggregator.app import create_app, prepare_state

    prepare_state(config)  # fail fast in the master, and import the first model once

    class _Server(BaseApplication):
        def load_config(self):
            for key, value in gunicorn_settings(config, host, port, workers, threads).items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return create_app(config)  # in each worker, after the fork

    print(f"fedkb serve: gunicorn on http://{host}:{port} with {workers} worker(s) x {threads} threads "
          f"(state {config.state_dir})", flush=True)
    _Server().run()
    return 0
