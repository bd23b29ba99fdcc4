"""`fedkb device`: run one real device (the edge runtime) against a `fedkb serve` server.

Examples:
    # a device that meets every condition, one cycle, with the user's text in notes.txt; the fleet
    # secret (needed at the first run only) from a file, never on the command line (`ps` shows it)
    fedkb device --server http://127.0.0.1:8080 --home runs/dev1 --enrollment-secret-file ~/.fedkb-secret \\
        --text notes.txt --state charging=1,idle=1,unmetered=1,battery=90 --once
    # the host's real state (battery, AC, user idle, network), cycling until Ctrl-C
    fedkb device --server http://127.0.0.1:8080 --home runs/dev1 --text notes.txt
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "device", help="run a device: store text, train when eligible, upload updates", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --state the host's real state is read: /sys/class/power_supply for charging and battery "
               "(no battery: on mains, 100%%), user idle from X11 or terminal activity, the default route for "
               "the network. The device trains only when idle AND charging AND unmetered AND battery >= "
               "--min-battery, with at least --min-new-examples new messages. The typed text never leaves HOME.")
    p.add_argument("--server", required=True, help="aggregator URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--home", required=True, type=Path,
                   help="the device's folder: credentials, example store, models, checkpoints")
    p.add_argument("--text", type=Path, action="append", default=[],
                   help="text file to import into the example store, one message per line (repeatable; "
                        "re-importing a file adds only its new lines)")
    p.add_argument("--state", default=None, metavar="SPEC",
                   help="fixed device state instead of the host's, e.g. charging=1,idle=1,unmetered=1,battery=90 "
                        "(keys not given count as met)")
    p.add_argument("--once", action="store_true", help="run one cycle and exit")
    p.add_argument("--cycles", type=int, default=None, help="stop after this many cycles (default: run until Ctrl-C)")
    p.add_argument("--enrollment-secret-file", type=Path, default=None, metavar="PATH",
                   help="file holding the fleet secret, needed for the first run (or FEDKB_ENROLLMENT_SECRET_FILE, "
                        "FEDKB_ENROLLMENT_SECRET)")
    # Deprecated: a value on the command line is visible to every user in `ps`.
    p.add_argument("--enrollment-secret", default=None, help=argparse.SUPPRESS)
    p.add_argument("--min-battery", type=float, default=None, help="battery percent needed to train (default: 20)")
    p.add_argument("--min-new-examples", type=int, default=None,
                   help="new messages needed before a job starts (default: 10)")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between checks while ineligible (default: 60)")
    p.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: derived from device and round)")
    p.add_argument("--model-signing-key", type=Path, action="append", default=[], metavar="FILE",
                   help="PEM public key that model versions must be signed with (repeatable, or several keys in "
                        "one file, for key rotation; default: the server's key, pinned at enrollment)")
    p.add_argument("--limits", type=Path, default=None, metavar="FILE",
                   help="JSON object overriding the device's limits on what a server may send or ask (keys of "
                        "edge_runtime.bounds.DownloadLimits and TaskBounds, e.g. {\"max_file_bytes\": 67108864, "
                        "\"max_epochs\": 50})")
    p.add_argument("--forget", action="store_true", help="delete the stored text (and derived job data) and exit")
    p.add_argument("--format", choices=("text", "json"), default="text", help="how to print each cycle's report")
    p.set_defaults(func=run)


def _enrollment_secret(args) -> str | None:
    """The fleet secret: --enrollment-secret-file, FEDKB_ENROLLMENT_SECRET_FILE, FEDKB_ENROLLMENT_SECRET,
    or the deprecated --enrollment-secret (with a warning)."""
    import sys

    from fedkb_core.secret_files import secret_from

    if args.enrollment_secret is not None:
        print("fedkb device: warning: --enrollment-secret puts the secret in every user's `ps`; "
              "use --enrollment-secret-file or FEDKB_ENROLLMENT_SECRET", file=sys.stderr)
        return args.enrollment_secret
    return secret_from(file=args.enrollment_secret_file, environ=os.environ, name="enrollment_secret",
                       what="enrollment secret")


def run(args) -> int:
    import dataclasses
    import json
    import threading

    from edge_runtime.bounds import DownloadLimits, TaskBounds, limits_from_json
    from edge_runtime.device import Device, DeviceConfig
    from edge_runtime.device_state import LinuxDeviceState, ScriptedDeviceState, parse_state_spec
    from edge_runtime.eligibility import EligibilityPolicy
    from fedkb_core.errors import FedkbError
    from fedkb_core.signing import TrustedKeys

    if args.threads < 1 or not 0 < args.poll <= 86400 or (args.cycles is not None and args.cycles < 1):
        raise FedkbError("--threads and --cycles must be >= 1 and --poll within (0, 86400]")
    if not args.server.startswith(("http://", "https://")):
        raise FedkbError(f"--server {args.server!r} must be an http:// or https:// URL")
    policy = EligibilityPolicy()
    try:
        policy = dataclasses.replace(policy, **{k: v for k, v in (("min_battery", args.min_battery),
                                                                 ("min_new_examples", args.min_new_examples))
                                                if v is not None})
    except ValueError as err:
        raise FedkbError(str(err)) from None
    downloads, bounds = DownloadLimits(), TaskBounds()
    if args.limits is not None:
        try:
            body = json.loads(args.limits.read_text())
        except (OSError, ValueError) as err:
            raise FedkbError(f"--limits {args.limits}: not a readable JSON file ({err})") from None
        downloads, bounds = limits_from_json(body, where=f"--limits {args.limits}")
    keys = TrustedKeys.from_files(args.model_signing_key) if args.model_signing_key else None
    state = ScriptedDeviceState(parse_state_spec(args.state)) if args.state is not None else LinuxDeviceState()
    device = Device(DeviceConfig(server_url=args.server, home=args.home, policy=policy, num_threads=args.threads,
                                 seed=args.seed, poll_seconds=args.poll, downloads=downloads, task_bounds=bounds,
                                 trusted_keys=keys), state=state)
    try:
        if args.forget:
            device.forget_user_data()
            print(f"fedkb device: deleted the stored text in {args.home}")
            return 0
        device.ensure_enrolled(_enrollment_secret(args))
        for path in args.text:
            device.import_text(path)
        cycles = 1 if args.once else args.cycles
        stop = threading.Event()
        reports = []
        try:
            reports = device.run(stop=stop, max_cycles=cycles)
        except KeyboardInterrupt:
            stop.set()
        for report in reports if args.once or args.cycles else []:
            if args.format == "json":
                print(json.dumps(report.to_json()))
            else:
                details = ", ".join(f"{k}={','.join(v) if isinstance(v, tuple) else v}"
                                    for k, v in report.to_json().items() if k != "action")
                print(f"{report.action}" + (f" ({details})" if details else ""))
        return 0
    finally:
        device.close()
