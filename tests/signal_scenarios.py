"""Runs of the daemon that raise a signal inside their own process, for tests/test_run.py.

A signal raised inside the pytest process reaches whatever that process still holds from the
tests before (zmq contexts, onnxruntime sessions, worker pipes): CI's run of session 44 died
of a segmentation fault there, which took the whole suite with it. Each scenario runs here, in
a fresh interpreter with faulthandler on, so a native crash costs one test and says where.

    python -X faulthandler -m tests.signal_scenarios SCENARIO CONFIG.json STORE

Prints the daemon's summary, then one line ``scenario: {json}`` with what the test asserts on
beyond the exit code (which is `run`'s own).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from live.config import ScopeConfig, validate_config
from live.run import Daemon, run


def during_the_checks(config: ScopeConfig, store: Path) -> tuple[int, dict[str, Any]]:
    """SIGINT while `Daemon.check` runs (where a Micro-Manager core can take seconds to load):
    handled by the daemon's handler, the run stops before anything starts."""
    original = Daemon.check
    sent: list[bool] = []

    def check(self: Daemon) -> None:
        if not sent:  # once: start() calls check() again
            sent.append(True)
            signal.raise_signal(signal.SIGINT)
        original(self)

    Daemon.check = check  # type: ignore[method-assign]
    code = run(config, duration_s=60.0, output=store, workers=1)
    return code, {"store_exists": store.exists()}


def while_stopping(config: ScopeConfig, store: Path) -> tuple[int, dict[str, Any]]:
    """SIGTERM while the run stops (its source finished): the default handlers come back,
    so one more signal would end the process; `run` restores the previous ones after."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    during: list[tuple[Any, Any]] = []
    original = Daemon._stop_router

    def stop_router(self: Daemon, *args: Any, **kwargs: Any) -> Any:
        if not during:
            signal.raise_signal(signal.SIGTERM)  # in this (the main) thread
            deadline = time.monotonic() + 30.0  # Python runs the handler at its next check
            while signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return original(self, *args, **kwargs)

    Daemon._stop_router = stop_router  # type: ignore[method-assign]
    code = run(config, duration_s=60.0, output=store, workers=1)
    after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    default = signal.SIG_DFL
    return code, {
        "default_while_stopping": during == [(default, default)],
        "restored_after": after == before,
    }


SCENARIOS: dict[str, Callable[[ScopeConfig, Path], tuple[int, dict[str, Any]]]] = {
    "during_the_checks": during_the_checks,
    "while_stopping": while_stopping,
}


def main(argv: list[str]) -> int:
    name, config_json, store = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = validate_config(json.loads(Path(config_json).read_text()), source=config_json)
    code, facts = SCENARIOS[name](config, Path(store))
    print("scenario: " + json.dumps(facts), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
