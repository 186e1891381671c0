"""The deliverables around the package: the systemd unit passes systemd-analyze, and scripts/demo.sh works,
twice in a row (the second run must cope with whatever the first left behind)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.mounting import mounts_under, no_mounts_left  # noqa: F401 - session fixture, used by being imported
from tests.servers import REPO, VENV_BIN

UNIT = REPO / "systemd" / "clearmlfs@.service"
DEMO = REPO / "scripts" / "demo.sh"
# Where the unit expects the CLI (the path a `pip install` into /usr/local gives).
INSTALLED_CLI = Path("/usr/local/bin/clearmlfs")


@pytest.fixture
def installed_cli() -> Path:
    """systemd-analyze verify insists the ExecStart binary exists: link the venv's CLI there if missing."""
    if not INSTALLED_CLI.exists():
        if os.geteuid() != 0:
            pytest.fail(f"{INSTALLED_CLI} is missing and only root may create it (ln -s {VENV_BIN}/clearmlfs)")
        INSTALLED_CLI.parent.mkdir(parents=True, exist_ok=True)
        INSTALLED_CLI.unlink(missing_ok=True)  # a dangling link from a removed venv
        INSTALLED_CLI.symlink_to(VENV_BIN / "clearmlfs")
    return INSTALLED_CLI


def verify(unit: str) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    # From the repository root, so the relative unit path resolves inside systemd/.
    return subprocess.run([analyze, "verify", unit], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("unit", ["systemd/clearmlfs@.service", "systemd/clearmlfs@mnt-clearml.service"])
def test_systemd_unit_verifies(installed_cli: Path, unit: str) -> None:
    done = verify(unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # warnings too


def test_systemd_unit_mounts_the_unescaped_instance_path() -> None:
    text = UNIT.read_text()
    escaped = subprocess.run(
        ["systemd-escape", "--path", "/mnt/clearml"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert escaped == "mnt-clearml"  # so clearmlfs@mnt-clearml.service is /mnt/clearml, via %f
    assert "ExecStart=/usr/local/bin/clearmlfs mount -f --config /etc/clearml.conf %f" in text
    assert "ExecStopPost=-/bin/fusermount3 -uz %f" in text
    assert "KillSignal=SIGTERM" in text and "Restart=on-failure" in text


def run_demo(demo_dir: Path, mnt: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", str(DEMO), "--check", "--skip-setup", str(mnt)],
        capture_output=True,
        text=True,
        timeout=240,
        env=demo_env(demo_dir),
        stdin=subprocess.DEVNULL,
    )
    output = f"demo exited {done.returncode}\n--- stdout:\n{done.stdout}\n--- stderr:\n{done.stderr}"
    assert done.returncode == 0, output + demo_logs(demo_dir)
    assert "hello from clearmlfs" in done.stdout and "round trip OK" in done.stdout, output
    assert mounts_under(mnt) == [], "the demo left its mount behind\n" + output
    assert not recorded_processes_alive(demo_dir), "the demo left a process running\n" + output
    return done


def demo_env(demo_dir: Path) -> dict[str, str]:
    # Its own DEMO_DIR: the test must not touch (or stop) a demo the developer is running from .demo/.
    return {**os.environ, "DEMO_DIR": str(demo_dir)}


def test_demo_runs_twice_in_a_row(tmp_path: Path) -> None:
    for _ in range(2):
        run_demo(tmp_path / "demo", tmp_path / "mnt")
    assert "\n.demo/\n" in f"\n{(REPO / '.gitignore').read_text()}"


def test_demo_recovers_from_a_killed_run(tmp_path: Path) -> None:
    demo_dir, mnt = tmp_path / "demo", tmp_path / "mnt"
    interactive = subprocess.Popen(
        ["bash", str(DEMO), "--skip-setup", str(mnt)],
        env=demo_env(demo_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    seen = []
    assert interactive.stdout is not None
    for line in interactive.stdout:  # ends at EOF if the demo fails
        seen.append(line)
        if "Press Ctrl-C" in line:
            break
    assert interactive.poll() is None, "".join(seen) + demo_logs(demo_dir)
    # kill -9 of everything, as a crash or an OOM kill would: no trap runs, the mount is left dead.
    pids = [interactive.pid] + [int((demo_dir / f).read_text()) for f in ("mount.pid", "weed.pid")]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    interactive.wait(timeout=30)
    assert mounts_under(mnt) == [str(mnt)]
    run_demo(demo_dir, mnt)


def recorded_processes_alive(demo_dir: Path) -> list[str]:
    alive = []
    for name in ("weed.pid", "mount.pid"):
        pid_file = demo_dir / name
        if pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists():
            alive.append(name)
    return alive


def demo_logs(demo_dir: Path) -> str:
    logs = []
    for name in ("mount.log", "weed.log"):
        path = demo_dir / name
        if path.exists():
            logs.append(f"\n--- {path} (tail):\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
    return "".join(logs)
