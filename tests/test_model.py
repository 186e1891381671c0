"""Model-based test: random sequences of file operations through ONE real mount (SeaweedFS behind a proxy that
injects faults), mirrored on a plain local folder, must give the same results step by step; at the end, a fresh
mount with an empty cache must find on the server exactly the files the model holds.

How faults are accounted for (the comparison stays exact):
- The proxy fails 3% of requests (503, reset, truncated body). The backends retry, so an operation rarely fails;
  when the mount answers EIO where the model succeeded, the operation is retried (up to 3 times). An EIO of
  `unlink`/`rmdir`/`rename`/`mkdir` may come after the server applied it, so a retry answering ENOENT (EEXIST for
  mkdir) counts as "applied by the first attempt".
- A write whose `close()` fails with EIO is applied: the mount keeps the bytes in its cache, dirty, serves them
  (read-your-writes) and uploads them later (the retry loop, or at unmount at the latest); the model applies it.
- Not generated (tested on their own: test_rename.py, test_open_files.py): directory renames, and renames and
  unlinks of the path held open by the writer handle.
  Reading, truncating and rewriting a file while the writer handle is open are generated: a local folder
  serves the bytes written so far, and so must the mount (it keeps them in its cache).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from clearmlfs.urls import url_to_mount_path
from tests import servers, stores
from tests.mounting import daemon_running, mounted, no_mounts_left, poll, unmount  # noqa: F401 - session fixture, used by import
from tests.proxy import Proxy
from tests.stores import Store

FAULT_RATE = 0.03
FAULT_SEED = 1234
DIRS = ["d0", "d1"]
FILES = ["f0", "f1", "d0/f0", "d0/f1", "d1/f0"]
EIO_RETRIES = 3
APPLIED_ON_RETRY = {"unlink": errno.ENOENT, "rmdir": errno.ENOENT, "rename": errno.ENOENT, "mkdir": errno.EEXIST}

Outcome = tuple[str, Any]  # ("ok", value) or ("err", errno name)


@dataclass
class Context:
    proxy: Proxy
    store: Store
    tmp: Path
    mnt: Path
    base_url: str
    runs: list[str] = field(default_factory=list)
    faults_absorbed: int = 0
    steps: int = 0

    @property
    def real_base(self) -> Path:
        return self.mnt / url_to_mount_path(self.base_url)

    @property
    def model_base(self) -> Path:
        return self.tmp / "model"


def outcome(action: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", action())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc)))


def write_file(path: Path, flags: int, data: bytes) -> None:
    """open/write/close; an EIO from close() is swallowed: the bytes are kept (dirty) and uploaded later."""
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    except OSError:
        os.close(fd)
        raise
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        MountModel.ctx.faults_absorbed += 1


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Relative path → content (None for a directory)."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in dirs:
            found[str((here / name).relative_to(root))] = None
        for name in files:
            found[str((here / name).relative_to(root))] = (here / name).read_bytes()
    return found


class MountModel(RuleBasedStateMachine):
    ctx: ClassVar[Context]

    def __init__(self) -> None:
        super().__init__()
        name = uuid.uuid4().hex[:10]
        self.real = self.ctx.real_base / name
        self.model = self.ctx.model_base / name
        self.model.mkdir(parents=True)
        self._retry_eio("mkdir", lambda: self.real.mkdir(), ("ok", None))
        self.ctx.runs.append(name)
        self.handle: tuple[int, int, str] | None = None  # (mount fd, model fd, path)

    # -- comparing ---------------------------------------------------------------------------------
    def _retry_eio(self, op: str, real: Callable[[], Any], expected: Outcome) -> Outcome:
        got = outcome(real)
        retried = False
        for _ in range(EIO_RETRIES):
            if got != ("err", "EIO") or expected == ("err", "EIO"):
                break
            self.ctx.faults_absorbed += 1
            retried = True
            got = outcome(real)
        applied = op in APPLIED_ON_RETRY and got == ("err", errno.errorcode[APPLIED_ON_RETRY[op]])
        if retried and expected[0] == "ok" and applied:
            return expected  # the first attempt had been applied by the server
        return got

    def both(self, op: str, action: Callable[[Path], Any]) -> Any:
        self.ctx.steps += 1
        expected = outcome(lambda: action(self.model))
        got = self._retry_eio(op, lambda: action(self.real), expected)
        assert got == expected, f"{op}: mount gave {got!r}, a local folder gives {expected!r}"
        return got

    # -- rules -------------------------------------------------------------------------------------
    @rule(path=st.sampled_from(FILES), data=st.binary(max_size=2048), append=st.booleans())
    def write(self, path: str, data: bytes, append: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self.both("append" if append else "write", lambda root: write_file(root / path, flags, data))

    @rule(path=st.sampled_from(FILES), size=st.integers(0, 3000))
    def truncate(self, path: str, size: int) -> None:
        self.both("truncate", lambda root: os.truncate(root / path, size))

    @rule(path=st.sampled_from(FILES))
    def read(self, path: str) -> None:
        self.both("read", lambda root: read_file(root / path))

    @rule(src=st.sampled_from(FILES), dst=st.sampled_from(FILES))
    def rename(self, src: str, dst: str) -> None:
        if self.handle is not None and self.handle[2] in (src, dst):
            return  # renaming the file held open is not modelled (see the module docstring)
        self.both("rename", lambda root: os.rename(root / src, root / dst))

    @rule(path=st.sampled_from(FILES))
    def unlink(self, path: str) -> None:
        if self.handle is not None and self.handle[2] == path:
            return
        self.both("unlink", lambda root: os.unlink(root / path))

    @rule(path=st.sampled_from(DIRS))
    def mkdir(self, path: str) -> None:
        self.both("mkdir", lambda root: os.mkdir(root / path))

    @rule(path=st.sampled_from(DIRS))
    def rmdir(self, path: str) -> None:
        if self.handle is not None and self.handle[2].startswith(path + "/"):
            return
        self.both("rmdir", lambda root: os.rmdir(root / path))

    @precondition(lambda self: self.handle is None)
    @rule(path=st.sampled_from(FILES))
    def open_for_writing(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        expected = outcome(lambda: os.open(self.model / path, flags, 0o644))
        got = self._retry_eio("open", lambda: os.open(self.real / path, flags, 0o644), expected)
        ok = got[0] == "ok" and expected[0] == "ok"
        if ok:
            self.handle = (got[1], expected[1], path)
        else:
            for result in (got, expected):
                if result[0] == "ok":
                    os.close(result[1])
        assert got[0] == expected[0] and (ok or got == expected), f"open {path}: mount {got!r}, model {expected!r}"

    @precondition(lambda self: self.handle is not None)
    @rule(data=st.binary(min_size=1, max_size=4096))
    def write_to_open_file(self, data: bytes) -> None:
        assert self.handle is not None
        real_fd, model_fd, path = self.handle
        os.write(model_fd, data)
        assert outcome(lambda: os.write(real_fd, data)) == ("ok", len(data)), f"write to open {path}"

    @precondition(lambda self: self.handle is not None)
    @rule()
    def read_file_being_written(self) -> None:
        assert self.handle is not None
        self.read(self.handle[2])

    @precondition(lambda self: self.handle is not None)
    @rule()
    def close(self) -> None:
        assert self.handle is not None
        real_fd, model_fd, path = self.handle
        self.handle = None
        os.close(model_fd)
        got = outcome(lambda: os.close(real_fd))
        if got == ("err", "EIO"):
            self.ctx.faults_absorbed += 1  # kept dirty, uploaded later: applied
        else:
            assert got == ("ok", None), f"close {path}: {got!r}"

    # -- invariants and teardown -------------------------------------------------------------------
    @invariant()
    def same_names(self) -> None:
        for folder in ["", *DIRS]:
            expected = outcome(lambda folder=folder: sorted(os.listdir(self.model / folder)))
            got = self._retry_eio("listdir", lambda folder=folder: sorted(os.listdir(self.real / folder)), expected)
            assert got == expected, f"ls {folder or '.'}: mount {got!r}, model {expected!r}"

    def teardown(self) -> None:
        if self.handle is not None:
            self.close()


@pytest.fixture(scope="module")
def model_mount(seaweedfs: servers.SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    tmp = tmp_path_factory.mktemp("model")
    with Proxy(upstream=seaweedfs.endpoint) as proxy:
        store = stores.seaweed_store(seaweedfs, host=proxy.host)
        conf = stores.write_conf(tmp / "run.conf", tmp / "run-cache", store)
        conf.chmod(0o600)
        with mounted(conf, tmp / "mnt") as mnt:
            ctx = Context(proxy, store, tmp, mnt, store.fresh_prefix())
            ctx.real_base.mkdir(parents=True)
            ctx.model_base.mkdir()
            yield ctx


def test_random_operations_match_a_local_folder_and_the_server_keeps_the_result(model_mount: Context) -> None:
    ctx = model_mount
    MountModel.ctx = ctx
    ctx.proxy.fail_rate(FAULT_RATE, kinds=("503", "reset", "truncate"), seed=FAULT_SEED)
    try:
        run_state_machine_as_test(
            MountModel,
            settings=settings(
                max_examples=15,
                stateful_step_count=30,
                deadline=None,
                database=None,
                derandomize=True,  # the same sequences every run: a failure reproduces
                phases=[Phase.explicit, Phase.generate],  # shrinking replays against a live server: too slow
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
    finally:
        faults = sum(1 for r in ctx.proxy.requests if r.fault)
        print(f"\n[model] runs={len(ctx.runs)} steps={ctx.steps} requests={len(ctx.proxy.requests)} "
              f"injected_faults={faults} eio_absorbed={ctx.faults_absorbed}")
        ctx.proxy.reset()
    # The daemon uploads what is still dirty after the unmount: wait until it has exited.
    problems = unmount(ctx.mnt)
    assert problems == "", problems
    assert poll(lambda: not daemon_running(ctx.mnt), 120, 0.2), "the first mount's daemon did not exit"

    conf = stores.write_conf(ctx.tmp / "verify.conf", ctx.tmp / "verify-cache", ctx.store)
    conf.chmod(0o600)
    with mounted(conf, ctx.tmp / "verify-mnt") as mnt:
        server = snapshot(mnt / url_to_mount_path(ctx.base_url))
    model = snapshot(ctx.model_base)
    missing = sorted(set(model) - set(server))
    extra = sorted(set(server) - set(model))
    differ = sorted(p for p in set(model) & set(server) if model[p] != server[p])
    assert (missing, extra, differ) == ([], [], []), (
        f"server vs model after a remount with an empty cache: missing {missing}, extra {extra}, differ {differ}"
    )
    shutil.rmtree(ctx.model_base)
