"""How every nsoclip command ends: one `error:` line and exit 2 for input it cannot use, dataloader
workers and the process group shut down on every path, and under torchrun one line per failure
instead of one per rank, which torchrun's own failure report repeats rather than buries.

Signals: outside the training loop SIGTERM and SIGINT keep (or get) their default action, so a
job in set-up, evaluation or exit ends at once; the training loop installs its own handler for
the duration of an epoch (train.StopOnSignal)."""
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .distributed import PEER_DIED, describe_collective_failure, shutdown
from .errors import NsoclipError
from .loader import stop_workers

USAGE_ERROR = 2
INTERNAL_ERROR = 1


def one_line(error: BaseException) -> str:
    """The message of an error in one line. Errors re-raised from dataloader workers carry the
    worker's traceback: keep its last line, without the exception's module path."""
    text = str(error).strip()
    last = text.splitlines()[-1] if text else type(error).__name__
    head, sep, tail = last.partition(": ")
    return tail if sep and "." in head and " " not in head else last


def from_dataloader_worker(error: BaseException) -> bool:
    return "in DataLoader worker process" in str(error)


def report(message: str) -> None:
    """Print `error: message` once per machine and hand it to torchrun's failure report.

    Under torchrun every rank has an error file in a folder of the restart attempt; the first
    local rank to claim a marker for this message there prints it, the others (which failed the
    same way) stay silent. The error file makes torchrun's summary show this line instead of a
    pointer to its documentation. torchrun names the failure with the earliest time stamp (whole
    seconds) its root cause; a rank that failed only because another one died is stamped a
    second later, so the rank that failed first is named."""
    line = f"error: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        stamp = int(time.time()) + (PEER_DIED in message)
        with open(error_file, "w") as handle:
            json.dump({"message": line, "timestamp": str(stamp)}, handle)
        marker = Path(error_file).parent.parent / f"nsoclip-error-{hashlib.sha1(line.encode()).hexdigest()[:16]}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # no shared attempt folder: print as a lone process would
    print(line, file=sys.stderr, flush=True)


def run_command(body: Callable[[], int], argv: Sequence[str]) -> int:
    """Run a CLI's body and turn its failure into an exit status; `--debug` in argv re-raises
    instead, with the full traceback."""
    debug = "--debug" in argv
    handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return body()
    except NsoclipError as error:
        if debug:
            raise
        report(one_line(error))
        return USAGE_ERROR
    except Exception as error:
        if debug:
            raise
        message = describe_collective_failure(error)
        if message is None and from_dataloader_worker(error):
            message = f"a dataloader worker failed: {one_line(error)}"
        if message is not None:
            report(message)
            return USAGE_ERROR
        traceback.print_exc()
        report(f"internal error {type(error).__name__}: {one_line(error)} (a bug: the traceback above shows where)")
        return INTERNAL_ERROR
    finally:
        stop_workers()
        shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
