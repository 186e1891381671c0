"""Run the same StorageManager calls through the real ClearML SDK and through clearmlfs, and compare.

The SDK keeps global state (its config, its cache managers), so it runs in a fresh process that knows only the
given clearml.conf; one process runs a whole batch of calls in order and prints their outcomes as JSON.
clearmlfs runs in this process, configured on the same file. Both outcomes have one form, `Outcome`, so a test
compares them with ``==``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SDK_TIMEOUT = 300.0

# What both sides run: each call's result made comparable (a stream's bytes as hex, a path as text).
_RUNNER = r"""
import json, logging, sys

def outcome(value=None, exc=None):
    if exc is not None:
        return {"value": None, "exc": type(exc).__name__}
    if value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
        # a stream: the bytes it yields; anything else (the SDK's pending upload): its type
        value = b"".join(value).hex() if hasattr(value, "__next__") else type(value).__name__
    return {"value": value, "exc": None}

def run(manager, calls):
    results = []
    for method, args, kwargs in calls:
        try:
            results.append(outcome(getattr(manager, method)(*args, **kwargs)))
        except Exception as exc:
            results.append(outcome(exc=exc))
    return results
"""

_SDK_MAIN = _RUNNER + r"""
logging.basicConfig(level=logging.DEBUG if sys.argv[1] == "debug" else logging.WARNING, stream=sys.stderr)
from clearml import StorageManager
print("RESULTS:" + json.dumps(run(StorageManager, json.loads(sys.stdin.read()))), flush=True)
"""

_SIGNATURES = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
from clearml import StorageManager as theirs
from clearmlfs import StorageManager as ours

def public(cls):
    return {name: [[p.name, repr(p.default)] for p in inspect.signature(getattr(cls, name)).parameters.values()]
            for name, member in vars(cls).items()
            if not name.startswith("_") and isinstance(member, classmethod)}

print(json.dumps([public(theirs), public(ours)]))
"""

_namespace: dict[str, Any] = {}
exec(compile(_RUNNER, "<differential runner>", "exec"), _namespace)


@dataclass(frozen=True)
class Call:
    """One classmethod call of StorageManager."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> list[Any]:
        return [self.method, list(self.args), self.kwargs]


def call(method: str, *args: Any, **kwargs: Any) -> Call:
    return Call(method, args, kwargs)


@dataclass(frozen=True)
class Outcome:
    value: Any
    exc: str | None  # the exception's class name, None if the call returned


@dataclass(frozen=True)
class SdkRun:
    outcomes: list[Outcome]
    log: str  # what the SDK process wrote to stderr (its logging)


def sdk_env(conf: Path, home: Path) -> dict[str, str]:
    """The environment of a process that knows nothing but `conf` (no API keys, no caller's settings)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8"}
    if "STORAGE_EMULATOR_HOST" in os.environ:  # (set by the gcs_emulator fixture)
        env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
    return env


def run_sdk(conf: Path, calls: Sequence[Call], debug: bool = False) -> SdkRun:
    """`calls`, in order, through ``clearml.StorageManager`` in one fresh process configured by `conf`."""
    done = subprocess.run(
        [sys.executable, "-c", _SDK_MAIN, "debug" if debug else "quiet"],
        input=json.dumps([c.as_json() for c in calls]), capture_output=True, text=True, timeout=SDK_TIMEOUT,
        env=sdk_env(conf, conf.parent / "sdk-home"),
    )
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULTS:")]
    assert done.returncode == 0 and found, f"clearml SDK failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return SdkRun([Outcome(**o) for o in json.loads(found[-1][len("RESULTS:") :])], done.stderr)


def run_ours(conf: Path, calls: Sequence[Call]) -> list[Outcome]:
    """`calls`, in order, through ``clearmlfs.StorageManager`` configured on `conf`, in this process."""
    from clearmlfs import StorageManager

    StorageManager.configure(conf)
    raw = _namespace["run"](StorageManager, [json.loads(json.dumps(c.as_json())) for c in calls])
    return [Outcome(**o) for o in raw]


def both(conf: Path, *calls: Call) -> tuple[list[Outcome], list[Outcome]]:
    """(SDK outcomes, clearmlfs outcomes) of the same calls on the same conf; the SDK runs first."""
    return run_sdk(conf, calls).outcomes, run_ours(conf, calls)


def signatures(conf: Path) -> tuple[dict[str, list[list[str]]], dict[str, list[list[str]]]]:
    """{classmethod: [[parameter, repr(default)], ...]} of the SDK's StorageManager and of ours."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGNATURES, str(Path(__file__).resolve().parent.parent)], capture_output=True,
        text=True, timeout=SDK_TIMEOUT, env=sdk_env(conf, conf.parent / "sdk-home"),
    )
    assert done.returncode == 0, done.stderr
    theirs, ours = json.loads(done.stdout.splitlines()[-1])
    return theirs, ours
