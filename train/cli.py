"""The `mmpt` command: one entry point, subcommands imported only when used (fast --help)."""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help). Each function takes argv (list[str]) and returns an
# exit code; it parses its own arguments. Later issues add rows here.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "model-info": ("train.model.info", "main", "parameter counts (total / activated) of a config"),
    "rank-memory": ("parallel.rank_memory", "main",
                    "what one rank holds at a layout: weights, fp32 grads, masters, optimizer state"),
    "plan": ("parallel.plan", "main",
             "per-GPU memory by pipeline stage, step time, tokens/s/GPU and MFU of a layout"),
    "ingest": ("data.ingest", "main", "build webdataset shards + indexes + manifest from local inputs"),
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmpt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from train.config import ConfigError

    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except ConfigError as e:
        print(f"mmpt {name}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
