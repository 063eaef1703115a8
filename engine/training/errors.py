"""How an entry point ends on bad user input: one line on stderr naming the key, file or value, exit status 2, no
traceback. Under torchrun the line also goes to the error file the launcher reads (TORCHELASTIC_ERROR_FILE), so its
failure summary names it as the root cause instead of "To enable traceback see ...". Any other exception is recorded
there with its traceback (torch's @record) and raised as usual: that is a bug, and its traceback is wanted."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, TypeVar

from engine.config import ConfigError

T = TypeVar("T")
EXIT_USAGE = 2


def run_cli(main: Callable[[], T]) -> T:
    """Call `main()`; a ConfigError ends the process with its message and status 2. A process that joined a gloo
    group ends, on success or status 2, without finalizing the interpreter (parallel.exit_skipping_finalization says
    why); a bug's exception is raised as usual."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from engine.training.parallel import exit_skipping_finalization, joined_gloo

    def guarded() -> T:
        try:
            return main()
        except ConfigError as e:
            write_error_file(str(e))
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None

    try:
        result = record(guarded)()
    except SystemExit as e:
        if joined_gloo() and e.code == EXIT_USAGE:
            exit_skipping_finalization(EXIT_USAGE)
        raise
    if joined_gloo():
        exit_skipping_finalization(0)
    return result


def write_error_file(message: str) -> None:
    """The torchelastic error file in the form torch's ErrorHandler writes, with our one line where the traceback
    goes: the launcher prints that as the failure's root cause. Nothing happens outside torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)
    except OSError as e:  # the launcher then reports the exit code alone; our line is still on stderr
        print(f"warning: could not write the torchrun error file {path}: {e}", file=sys.stderr)
