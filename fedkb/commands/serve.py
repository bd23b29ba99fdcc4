"""`fedkb serve`: run the aggregation server on a state directory.

Examples:
    fedkb serve --state runs/server --init-model runs/model --port 8080 \\
        --enrollment-secret "$SECRET" --admin-token "$ADMIN"
    FEDKB_ENROLLMENT_SECRET=... FEDKB_ADMIN_TOKEN=... fedkb serve --state runs/server --workers 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

# (flag, field, type, help); defaults are the AggregatorConfig's, shown in the help text.
_ROUND_FLAGS = (
    ("--min-clients", "min_clients", int, "a round that ends with fewer updates is abandoned"),
    ("--goal-clients", "goal_clients", int, "a round closes as soon as this many updates are accepted"),
    ("--over-selection", "over_selection", float, "tasks handed out per round = ceil(goal x this)"),
    ("--round-timeout", "round_timeout", float, "seconds from a round's opening to its deadline"),
    ("--clip-norm", "clip_norm", float, "L2 norm every update is clipped to (device and server)"),
    ("--server-lr", "server_lr", float, "server learning rate (1.0 = plain FedAvg)"),
    ("--server-momentum", "server_momentum", float, "server momentum in [0, 1) (FedAvgM; sgd only)"),
    ("--server-optimizer", "server_optimizer", str, "sgd (FedAvg, FedAvgM) or adam (FedAdam)"),
    ("--server-beta1", "server_beta1", float, "FedAdam's first-moment decay"),
    ("--server-beta2", "server_beta2", float, "FedAdam's second-moment decay"),
    ("--server-epsilon", "server_epsilon", float, "FedAdam's epsilon (adaptivity)"),
    ("--device-lr", "device_lr", float, "learning rate of on-device SGD"),
    ("--device-epochs", "device_epochs", int, "local epochs per task"),
    ("--device-batch-size", "device_batch_size", int, "must equal the model's static batch size (default: it)"),
    ("--device-max-examples", "device_max_examples", int, "most examples a device may train on (and report)"),
    ("--encoding", "encoding", str, "update encoding devices should use: float32, float16 or int8"),
    ("--max-body-bytes", "max_body_bytes", int, "largest accepted upload (default: float32 update + header)"),
    ("--retry-after", "retry_after", float, "seconds a device without work waits (jittered)"),
    ("--retry-jitter", "retry_jitter", float, "retry-after is scaled by U(1-j, 1+j)"),
    ("--checkpoint-interval", "checkpoint_interval", float, "seconds between running-sum checkpoints"),
)


def register(subparsers) -> None:
    import dataclasses

    from aggregator.config import AggregatorConfig

    defaults = {f.name: f.default for f in dataclasses.fields(AggregatorConfig)}
    p = subparsers.add_parser(
        "serve", help="run the aggregation server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings are layered: built-in defaults, then --config FILE (JSON or .toml, keys as the long "
               "flag names with underscores), then FEDKB_<NAME> environment variables (e.g. FEDKB_GOAL_CLIENTS), "
               "then flags. The enrollment secret and admin token have no default.")
    p.add_argument("--state", required=True, type=Path, help="state directory (SQLite database, model versions)")
    p.add_argument("--init-model", type=Path, default=None,
                   help="folder written by `fedkb export`; imported as the first version of a new state directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="1: one process (threaded Flask/Werkzeug server); N > 1: gunicorn with N worker processes "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=8, help="request threads per gunicorn worker (default: %(default)s)")
    p.add_argument("--config", type=Path, default=None, help="JSON or TOML file of settings")
    p.add_argument("--enrollment-secret", default=None, help="secret devices present to enroll (or FEDKB_ENROLLMENT_SECRET)")
    p.add_argument("--admin-token", default=None, help="bearer token for /v1/admin/* (or FEDKB_ADMIN_TOKEN)")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    rounds = p.add_argument_group("rounds and aggregation")
    for flag, field, kind, text in _ROUND_FLAGS:
        rounds.add_argument(flag, dest=field, type=kind, default=None,
                            help=f"{text} (default: {defaults[field]})")
    p.set_defaults(func=run)


def config_from_args(args):
    """The AggregatorConfig for parsed arguments (file → environment → flags)."""
    from aggregator.config import load_config

    overrides = {field: getattr(args, field) for _, field, _, _ in _ROUND_FLAGS}
    overrides.update(state_dir=args.state, init_model=args.init_model, enrollment_secret=args.enrollment_secret,
                     admin_token=args.admin_token, log_json=False if args.plain_logs else None)
    return load_config(file=args.config, overrides=overrides)


def run(args) -> int:
    import logging

    from fedkb_core.errors import FedkbError

    if args.workers < 1 or args.threads < 1:
        raise FedkbError("--workers and --threads must be at least 1")
    config = config_from_args(args)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.workers == 1:
        return _serve_werkzeug(config, args.host, args.port)
    return _serve_gunicorn(config, args.host, args.port, args.workers, args.threads)


def _serve_werkzeug(config, host: str, port: int) -> int:
    import signal

    from werkzeug.serving import make_server

    from aggregator.app import create_app
    from aggregator.server_errors import JsonErrorRequestHandler

    app = create_app(config)
    server = make_server(host, port, app, threaded=True, request_handler=JsonErrorRequestHandler)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"fedkb serve: listening on http://{host}:{server.server_port} (state {config.state_dir})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions["fedkb"].worker.stop()
        server.server_close()
    return 0


def _interrupt(signum, frame):
    """SIGTERM stops like Ctrl-C, so the worker thread ends cleanly (kill -9 is safe too)."""
    raise KeyboardInterrupt


def _serve_gunicorn(config, host: str, port: int, workers: int, threads: int) -> int:
    from gunicorn.app.base import BaseApplication

    from aggregator.app import create_app, prepare_state

    prepare_state(config)  # fail fast in the master, and import the first model once

    class _Server(BaseApplication):
        def load_config(self):
            settings = {"bind": f"{host}:{port}", "workers": workers, "threads": threads,
                        # gthread, answering its own parse errors (431, 414, ...) in JSON
                        "worker_class": "aggregator.server_errors.JsonErrorThreadWorker",
                        "timeout": 120, "graceful_timeout": 10, "accesslog": None,
                        # gunicorn >= 25 opens a control socket in $HOME by default, shared by every
                        # instance of the user; fedkb does not use it.
                        "control_socket_disable": True}
            for key, value in settings.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return create_app(config)  # in each worker, after the fork

    print(f"fedkb serve: gunicorn on http://{host}:{port} with {workers} workers x {threads} threads "
          f"(state {config.state_dir})", flush=True)
    _Server().run()
    return 0
