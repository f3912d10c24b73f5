"""Which errors the ``loca`` command reports as one line (exit status 2), and which keep their traceback.

A user's mistake in a config or a file (a missing dataset folder, weights that do not fit, a value out of range, a
GPU asked for where there is none) is reported by the check that found it, in a message that names the key or file:
the traceback adds nothing. A bug keeps its traceback. The line between them: an error the project's own code raises
on purpose (a ``raise`` statement in ``loca_lightning``) of a type that means bad input, or a Lightning
``MisconfigurationException``, is the user's; anything else (an error inside torch, a failed assertion, a ``TypeError``
from a wrong call) is a bug. ``LOCA_TRACEBACK=1`` shows the traceback of every error.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

INPUT_ERRORS = (ValueError, TypeError, OSError, RuntimeError)  # RuntimeError: ImageReadError (an unreadable image)
BUG_ERRORS = (NotImplementedError, RecursionError)


def user_error(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain of causes (jsonargparse wraps a constructor's error) that a user caused, if any."""
    while error is not None:
        if isinstance(error, MisconfigurationException):
            return error
        if isinstance(error, INPUT_ERRORS) and not isinstance(error, BUG_ERRORS) and _raised_on_purpose(error):
            return error
        error = error.__cause__
    return None


def _raised_on_purpose(error: BaseException) -> bool:
    """Whether the innermost frame of ``error`` is a ``raise`` statement of this package."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return module.split(".")[0] == "loca_lightning" and line.lstrip().startswith("raise")


@contextlib.contextmanager
def one_line_user_errors(prog: str = "loca") -> Iterator[None]:
    """Report a user's error as ``prog: error: message`` on stderr with exit status 2; let every other error through."""
    try:
        yield
    except Exception as error:
        cause = None if os.environ.get("LOCA_TRACEBACK") == "1" else user_error(error)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(2)


def check_devices(trainer: Any) -> None:
    """Raise ValueError with the flags to use when the trainer config (a mapping or namespace) asks for GPUs this
    machine does not have."""
    accelerator, devices = trainer.get("accelerator"), trainer.get("devices")
    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "gpu" and available == 0 and torch.backends.mps.is_available():
        available = 1
    if available == 0:
        flags = "--trainer.accelerator cpu --trainer.devices 1"
        if trainer.get("strategy") not in (None, "auto"):
            flags += " --trainer.strategy auto"  # DDP/FSDP across GPUs
        if str(trainer.get("precision")) in ("16", "16-mixed", "16-true"):
            flags += " --trainer.precision bf16-mixed"  # float16 autocast is GPU-only
        raise ValueError(
            f"the config asks for trainer.accelerator: {accelerator} but this machine has no GPU; on the CPU: {flags}"
        )
    wanted = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
    if wanted is not None and wanted > available:
        raise ValueError(
            f"the config asks for trainer.devices: {wanted} GPUs but this machine has {available}: "
            f"--trainer.devices {available} (the lr follows the global batch; see the config's header)"
        )
