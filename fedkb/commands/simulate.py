"""`fedkb simulate`: emulate a fleet of devices against a real aggregator and report."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fedkb.commands.baseline import add_model_arguments, model_config_from_args
from fedkb_core.training_config import TRAINING, field_help


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate", help="run federated training on an emulated device fleet and report perplexity",
        description="Prepare the data (or reuse --data), export the initial model, start a real "
        "aggregator on loopback and emulate --clients devices (each the LiteRT device stack with one "
        "client's text) on a simulated daily clock. Writes DIR/report.json and DIR/report.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="shakespeare", help="shakespeare, jsonl:PATH, csv:PATH or dir:PATH")
    parser.add_argument("--data", type=Path, default=None, help="reuse a folder from `fedkb data prepare`")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--clients", type=int, default=300, help="emulated devices")
    parser.add_argument("--clients-per-round", type=int, default=TRAINING.goal_clients,
                        help="updates a round aggregates, its goal (the server's --goal-clients)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds to run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="device worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("fedkb", "tff"), default="fedkb",
                        help="fedkb: real server + LiteRT devices; tff: TensorFlow Federated reference")
    parser.add_argument("--baseline", type=Path, default=None, help="a `fedkb baseline` output, drawn as reference")
    # Defaults from fedkb_core/training_config.py, the same as `fedkb serve`'s.
    group = parser.add_argument_group("rounds and devices (the defaults are `fedkb serve`'s)")
    group.add_argument("--device-lr", type=float, default=TRAINING.device_lr, help="on-device SGD learning rate")
    group.add_argument("--device-epochs", type=int, default=TRAINING.device_epochs, help="local epochs per task")
    group.add_argument("--max-examples", type=int, default=TRAINING.device_max_examples,
                       help="windows per device per round (the server's --device-max-examples)")
    group.add_argument("--clip-norm", type=float, default=TRAINING.clip_norm, help="L2 clip of every update")
    # "%(default).0s" prints nothing; it keeps the formatter from adding "(default: None)".
    group.add_argument("--server-lr", type=float, default=None,
                       help=f"server learning rate {field_help('server_lr')}%(default).0s")
    group.add_argument("--server-optimizer", choices=("adam", "sgd"), default=TRAINING.server_optimizer,
                       help="adam: FedAdam; sgd: FedAvg, or FedAvgM with --server-momentum")
    group.add_argument("--server-momentum", type=float, default=TRAINING.server_momentum,
                       help="FedAvgM server momentum (sgd only)")
    group.add_argument("--round-hours", type=float, default=1.0, help="simulated hours between rounds")
    group.add_argument("--over-selection", type=float, default=None,
                       help=f"tasks handed out per round as a multiple of its goal {field_help('over_selection')}; 1.0: "
                            "exactly the goal, for comparisons with --backend tff)")
    group.add_argument("--job-minutes", type=float, default=None,
                       help="simulated duration of a device's job, during which its night may end and it drops "
                            "out (default: 10; 0: no dropout)")
    group.add_argument("--eval-windows", type=int, default=256, help="held-out windows evaluated per round")
    group.add_argument("--eval-words", type=int, default=150, help="word boundaries scored for top-k per round")
    group.add_argument("--vocab-size", type=int, default=8000, help="when preparing the data here")
    _add_update_arguments(parser)
    _add_secagg_arguments(parser)
    _add_privacy_arguments(parser)
    add_model_arguments(parser)
    _add_canary_arguments(parser)
    parser.set_defaults(func=run)


def _add_update_arguments(parser) -> None:
    """`fedkb serve`'s --update-encoding and --update-bits, passed on to the server the fleet starts."""
    from fedkb.commands.serve import UPDATE_FLAGS

    group = parser.add_argument_group("update encoding (uploads)")
    for flag, field, kind, text in UPDATE_FLAGS:
        group.add_argument(flag, dest=field, type=kind, default=getattr(TRAINING, field),
                           help=f"{text} {field_help(field)}%(default).0s")


def _add_flag_group(parser, title: str, flags) -> None:
    """One group of `fedkb serve`'s (flag, field, type, help) flags, passed on to the server the
    fleet starts, with the same defaults (TrainingConfig's)."""
    group = parser.add_argument_group(title)
    for flag, field, kind, text in flags:
        # "%(default).0s" prints nothing; field_help says the default (derived ones in words).
        if kind is bool:
            group.add_argument(flag, dest=field, action="store_true", help=f"{text} {field_help(field)}%(default).0s")
        else:
            group.add_argument(flag, dest=field, type=kind, default=getattr(TRAINING, field),
                               help=f"{text} {field_help(field)}%(default).0s")


def _add_secagg_arguments(parser) -> None:
    """`fedkb serve`'s secure-aggregation flags; every emulated phone then runs every stage of
    every round (simulation.secagg_round)."""
    from fedkb.commands.serve import SECAGG_FLAGS

    _add_flag_group(parser, "secure aggregation (off unless --secure-aggregation is given)", SECAGG_FLAGS)


def _add_privacy_arguments(parser) -> None:
    """`fedkb serve`'s differential-privacy flags."""
    from fedkb.commands.serve import DP_FLAGS

    _add_flag_group(parser, "differential privacy (off unless --dp-noise-multiplier is given)", DP_FLAGS)


def _add_canary_arguments(parser) -> None:
    from simulation.canaries import ALPHABETS, CanaryConfig

    group = parser.add_argument_group("memorization audit (Carlini et al. 2019, \"The Secret Sharer\")")
    group.add_argument("--canaries", type=int, default=0, metavar="K",
                       help="plant K random canary phrases in the training text of K devices and report each "
                            "one's exposure and whether the keyboard's top 3 completes it (0: no audit)")
    group.add_argument("--canary-repeats", type=_counts, default=",".join(map(str, CanaryConfig.repeats)), metavar="N,N,...",
                       help="how many times each canary is typed, canary k the k-th count (cycling)")
    group.add_argument("--canary-prefix", default=CanaryConfig.prefix, help="the words before each secret")
    group.add_argument("--canary-length", type=int, default=CanaryConfig.length, help="secret words per canary")
    group.add_argument("--canary-alphabet", default=None, metavar="NAME|W1,W2,...",
                       help=f"the secret's words: {' or '.join(ALPHABETS)} or a comma-separated list (default: "
                            "digits, or number words for a tokenizer without digits)%(default).0s")
    group.add_argument("--canary-candidates", type=int, default=CanaryConfig.max_candidates,
                       help="score every candidate secret up to this many; beyond, a random sample this large "
                            "(exposure estimated, extrapolated in the tail as in the paper)")


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts such as 1,4,16, got {text!r}") from None


def canary_config_from_args(args):
    """The audit's CanaryConfig for parsed arguments (None without --canaries)."""
    from fedkb_core.errors import FedkbError
    from simulation.canaries import ALPHABETS, CanaryConfig

    if not args.canaries:
        return None
    alphabet = args.canary_alphabet
    if alphabet is not None:
        alphabet = ALPHABETS.get(alphabet) or tuple(w.strip() for w in alphabet.split(","))
    config = CanaryConfig(count=args.canaries, repeats=args.canary_repeats, prefix=args.canary_prefix,
                          length=args.canary_length, alphabet=alphabet, max_candidates=args.canary_candidates,
                          seed=args.seed)
    problems = config.problems()
    if problems:
        raise FedkbError("; ".join(problems))
    if args.backend != "fedkb":
        raise FedkbError("--canaries needs --backend fedkb: the audit measures the versions the server publishes")
    return config


def fleet_config_from_args(args):
    """The FleetConfig for parsed arguments; its server settings resolve as `fedkb serve`'s do."""
    from fedkb_core.errors import FedkbError
    from fedkb_core.training_config import TrainingConfig
    from model.evaluation import EvalConfig
    from simulation.fleet import PRIVACY_FIELDS, SECAGG_FIELDS, UPDATE_FIELDS, FleetConfig

    for name in ("clients", "clients_per_round", "rounds", "workers", "device_epochs", "max_examples"):
        if getattr(args, name) < 1:
            raise FedkbError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.clients_per_round > args.clients:
        raise FedkbError(f"--clients-per-round ({args.clients_per_round}) cannot exceed --clients ({args.clients})")
    if args.data is None and ":" not in args.dataset and args.dataset != "shakespeare":
        raise FedkbError(f"unknown dataset {args.dataset!r}; expected shakespeare, jsonl:PATH, csv:PATH or dir:PATH")
    if args.server_momentum and args.server_optimizer != "sgd":
        raise FedkbError("--server-momentum applies to --server-optimizer sgd (FedAvgM) only")
    if args.over_selection is not None and args.over_selection < 1.0:
        raise FedkbError(f"--over-selection must be at least 1.0, got {args.over_selection}")
    if args.job_minutes is not None and args.job_minutes < 0:
        raise FedkbError(f"--job-minutes must not be negative, got {args.job_minutes}")
    unless_default = {k: v for k, v in (("over_selection", args.over_selection), ("job_minutes", args.job_minutes))
                      if v is not None}
    privacy = {name: getattr(args, name) for name in PRIVACY_FIELDS}
    uploads = {name: getattr(args, name, getattr(TRAINING, name)) for name in UPDATE_FIELDS}
    secagg = {name: getattr(args, name, getattr(TRAINING, name)) for name in SECAGG_FIELDS}
    if privacy["dp_population"] is None and privacy["dp_noise_multiplier"] is not None:
        privacy["dp_population"] = args.clients  # the fleet is the whole population
    training = TrainingConfig(goal_clients=args.clients_per_round, clip_norm=args.clip_norm,
                              server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                              server_momentum=args.server_momentum, device_lr=args.device_lr,
                              device_epochs=args.device_epochs, device_max_examples=args.max_examples, **uploads,
                              **privacy, **secagg)
    problems = training.training_problems()
    if problems:
        raise FedkbError("; ".join(problems))
    if training.dp_enabled and getattr(args, "backend", "fedkb") != "fedkb":
        raise FedkbError("--dp-noise-multiplier runs on --backend fedkb only (the TFF reference has no DP here)")
    if training.secure_aggregation and getattr(args, "backend", "fedkb") != "fedkb":
        raise FedkbError("--secure-aggregation runs on --backend fedkb only (the TFF reference has no SecAgg here)")
    if training.update_encoding != TRAINING.update_encoding and getattr(args, "backend", "fedkb") != "fedkb":
        raise FedkbError("--update-encoding runs on --backend fedkb only (the TFF reference uploads float32)")
    return FleetConfig(
        clients=args.clients, clients_per_round=args.clients_per_round, rounds=args.rounds, workers=args.workers,
        seed=args.seed, device_lr=args.device_lr, device_epochs=args.device_epochs, max_examples=args.max_examples,
        clip_norm=args.clip_norm, server_lr=training.server_lr, server_momentum=args.server_momentum,
        server_optimizer=args.server_optimizer, round_hours=args.round_hours, **unless_default, **privacy,
        update_encoding=training.update_encoding, update_bits=training.update_bits, **secagg,
        eval=EvalConfig(seq_len=args.seq_len, max_windows=args.eval_windows, recall_samples=args.eval_words))


def _quiet_emulated_devices(verbose: bool) -> None:
    """Hundreds of emulated phones each log their enrollment, downloads and swaps at INFO, which
    buries the per-round lines a data scientist reads; keep their warnings and errors (and all of
    it with -v). This is the fleet's own process, where devices enroll, check in and download;
    the spawned workers configure no handler, so only their warnings reach stderr anyway."""
    if not verbose:
        logging.getLogger("edge_runtime").setLevel(max(logging.getLogger().level, logging.WARNING))


def run(args) -> int:
    from fedkb.signals import stop_on_sigterm_like_ctrl_c
    from simulation.run import simulate

    stop_on_sigterm_like_ctrl_c()  # its server and device workers stop with it
    _quiet_emulated_devices(getattr(args, "verbose", False))
    fleet = fleet_config_from_args(args)
    canaries = canary_config_from_args(args)
    model = model_config_from_args(args, vocab_size=args.vocab_size)
    report = simulate(dataset=args.dataset, out=args.out, fleet=fleet, model=model, data_dir=args.data,
                      backend=args.backend, baseline=args.baseline, vocab_size=args.vocab_size, canaries=canaries)
    s = report["summary"]
    print(f"{s['rounds']} rounds ({args.backend}) in {s['seconds']:.0f} s ({s['seconds_per_round']:.1f} s per round "
          f"before evaluation); model version {s['final_model_version']}")
    print(f"held-out word perplexity {s['word_perplexity_before']:.1f} -> {s['word_perplexity_after']:.1f}, "
          f"top-1 {s['top1_before']:.3f} -> {s['top1_after']:.3f}")
    if s.get("top1_fraction_of_baseline") is not None:
        print(f"top-1 recall is {100 * s['top1_fraction_of_baseline']:.0f}% of the centralized baseline's")
    if report["canaries"]:
        from simulation.canaries import summary_line

        print(summary_line(report["canaries"]))
    print(f"report: {args.out / 'report.json'}\nplot:   {args.out / 'report.png'}")
    return 0
