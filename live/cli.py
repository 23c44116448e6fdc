"""The ``deepz-live`` command: one entry point that runs each of the project's tools.

``deepz-live COMMAND [ARGS]`` runs what ``python -m MODULE [ARGS]`` runs (the table below), so
both spellings stay equivalent and each tool keeps its own ``--help``. A command's module is
imported only when it runs: ``deepz-live run`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": (
        "live.run",
        "run the live daemon (simulated scope or Micro-Manager)",
        "deepz-live run --scope config.toml --duration 20",
    ),
    "refocus": (
        "live.refocus",
        "refocus a recording offline, or fill the stacks a run skipped",
        "deepz-live refocus runs/RUN.ome.zarr --fill-gaps",
    ),
    "train": (
        "engine.train",
        "train a Deep-Z model (extra: train)",
        "deepz-live train --config configs/train_slim.toml",
    ),
    "evaluate": (
        "engine.evaluate",
        "write the per-plane evaluation report (volume models: python -m engine.fidelity)",
        "deepz-live evaluate --out docs/evaluation",
    ),
    "export": (
        "export.__main__",
        "export weights to ONNX, or build a TensorRT engine (extras: export, gpu)",
        "deepz-live export onnx --weights W.pt --out W.onnx",
    ),
    "keys": (
        "live.keys",
        "make CURVE keys for the daemon's sockets",
        "deepz-live keys keys/ --client viewer",
    ),
    "view": (
        "live.display",
        "open a napari window on a running daemon's stacks or a recording (extra: view)",
        "deepz-live view runs/RUN.ome.zarr",
    ),
    "status": (
        "live.status_client",
        "print a running daemon's state, rates, losses and output, once or each second",
        "deepz-live status --scope config.toml --once",
    ),
}
"""Command name -> (module whose ``main(argv)`` runs it, what it does, an example)."""


def _usage() -> str:
    """Return the top-level help: one line per command, then an example of each."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: deepz-live COMMAND [ARGS ...]",
        "",
        "Live Deep-Z: refocus wide-field frames onto virtual 3D stacks in real time.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {what}" for name, (_, what, _) in COMMANDS.items()),
        "",
        "examples:",
        *(f"  {example}" for _, _, example in COMMANDS.values()),
        "",
        "deepz-live COMMAND --help shows the options of one command.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deepz-live COMMAND [ARGS]``; returns the command's exit status (2: bad usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"deepz-live: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    status = module.main(rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
