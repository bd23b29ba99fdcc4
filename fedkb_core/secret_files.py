"""Secrets from files or the environment, never from the command line (`ps` shows every argument).

`fedkb serve` (enrollment secret, admin token) and `fedkb device` (enrollment secret) read a secret
from `--NAME-file PATH`, from `FEDKB_NAME_FILE=PATH` or from `FEDKB_NAME` (the systemd / Docker
secrets convention of a file per secret, mode 0600, holding the value and maybe a newline).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Mapping

from fedkb_core.errors import FedkbError

log = logging.getLogger(__name__)


class SecretFileError(FedkbError):
    """A secret file that is missing, unreadable or empty."""


def read_secret_file(path: Path | str, *, what: str) -> str:
    """The secret in `path`: its text without the trailing newline(s) an editor or `echo` adds.

    Warns (does not refuse) when other users may read the file.

    Raises:
        SecretFileError: the file is missing, not a regular file, unreadable, not UTF-8, or empty.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{what} file {path}: not a regular file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretFileError(f"{what} file {path}: no such file") from None
    except PermissionError:
        raise SecretFileError(f"{what} file {path}: permission denied") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} file {path}: not UTF-8 text") from None
    except OSError as err:
        raise SecretFileError(f"{what} file {path}: {err.strerror or err}") from None
    secret = text.rstrip("\r\n")
    if not secret.strip():
        raise SecretFileError(f"{what} file {path}: empty")
    if info.st_mode & stat.S_IROTH:
        log.warning("%s file %s is readable by every user (mode %o); chmod 600 it", what, path,
                    stat.S_IMODE(info.st_mode))
    return secret


def secret_from(*, file: Path | str | None, environ: Mapping[str, str] | None, name: str, what: str) -> str | None:
    """A secret from `file`, else `FEDKB_<NAME>_FILE`, else `FEDKB_<NAME>`; None when none is set."""
    env = os.environ if environ is None else environ
    variable = f"FEDKB_{name.upper()}"
    if file is not None:
        return read_secret_file(file, what=what)
    if env.get(f"{variable}_FILE"):
        return read_secret_file(env[f"{variable}_FILE"], what=f"{what} ({variable}_FILE)")
    return env.get(variable) or None
