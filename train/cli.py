"""The `mmpt` command: one entry point, subcommands imported only when used (fast --help).

Errors. A `train.errors.UserError` (bad config field, missing or mismatched file, dataset,
checkpoint or store; ConfigError is one) is printed here and nowhere else, as one line
`mmpt COMMAND: error: MESSAGE` on stderr, exit status 2, with the traceback only when
MMPT_DEBUG=1. Under torchrun (RANK set) rank 0 prints it at once; another rank first waits
`PEER_REPORT_DELAY_S`: when rank 0 failed the same way, torchrun stops that rank in the meantime
and the user sees the error once; when only that rank failed, it then prints the line with its
rank. Any other exception is a bug and keeps its traceback on every rank.

Shutdown. As the program (`mmpt` or `python -m train.cli`, i.e. `main()` without argv), `train`
ends the process with os._exit once its output is flushed, instead of returning into interpreter
finalization: gloo's worker threads release the tensors of a finished collective shortly after
the collective returns, which needs the GIL; if that happens after finalization began, CPython
ends the thread and libstdc++ aborts the rank ("terminate called without an active exception",
SIGABRT after all steps finished). By then the run has closed its logs, written its checkpoints
and destroyed the process group, so nothing is lost by skipping finalization.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback

from train.errors import ConfigError, UserError

DEBUG_ENV = "MMPT_DEBUG"
PEER_REPORT_DELAY_S = 3.0

# name -> (module, function, one-line help). Each function takes argv (list[str]) and returns an
# exit code; it parses its own arguments. Later issues add rows here.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "model-info": ("train.model.info", "main", "parameter counts (total / activated) of a config"),
    "rank-memory": ("parallel.rank_memory", "main",
                    "what one rank holds at a layout: weights, fp32 grads, masters, optimizer state"),
    "plan": ("parallel.plan_cli", "main",
             "per-GPU memory by pipeline stage, step time, tokens/s/GPU and MFU of a layout"),
    "ingest": ("data.ingest_cli", "main", "build webdataset shards + indexes + manifest from local inputs"),
    "data": ("data.inspect", "main", "data inspect: realised mix, packing efficiency, cache stats, PNG of a sequence"),
    "plot": ("train.plot", "main", "PNG of loss, throughput and expert balance of a run"),
    "train": ("launch.train", "main", "train from a TOML config (one rank per process under torchrun)"),
    "export-hf": ("train.hf_export", "export_main",
                  "write the newest checkpoint as a transformers Kimi-K2.5 directory"),
    "import-hf": ("train.hf_export", "import_main",
                  "make a checkpoint to continue pretraining from a transformers directory"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {n:<{width}}  {h}" for n, (_, _, h) in sorted(COMMANDS.items()))
    return f"usage: mmpt COMMAND [ARGS...]\n\ncommands:\n{rows}\n\nRun 'mmpt COMMAND --help' for a command's options."


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report_user_error(command: str, e: UserError) -> int:
    """Print e as one line (see the module docstring); returns the exit status, 2."""
    if debug_enabled():
        traceback.print_exception(e)
    kind = "config error" if isinstance(e, ConfigError) else "error"
    text = str(e)
    if "Traceback (most recent call last)" in text:  # re-raised from a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last  # drop "module.Class: "
    message = " ".join(text.split())  # one line, whatever the message held
    rank = os.environ.get("RANK", "0").strip() or "0"
    if rank != "0":
        time.sleep(PEER_REPORT_DELAY_S)
        print(f"mmpt {command}: rank {rank}: {kind}: {message}", file=sys.stderr, flush=True)
    else:
        print(f"mmpt {command}: {kind}: {message}", file=sys.stderr, flush=True)
    return 2


def run_command(name: str, rest: list[str]) -> int:
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except UserError as e:
        return report_user_error(name, e)


def _exit_process(status: int) -> None:
    """Flush everything and end the process without interpreter finalization (module docstring)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmpt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if not (as_program and name == "train"):
        return run_command(name, rest)
    try:
        status = run_command(name, rest)
    except SystemExit as e:  # argparse: --help, bad arguments
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # a bug: its traceback, then the same clean exit
        traceback.print_exc()
        status = 1
    _exit_process(status)


if __name__ == "__main__":
    sys.exit(main())
