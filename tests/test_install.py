"""Installing `peer` without the repository's .venv: the wheel holds every package and the `peer`
command, and a user-scheme install (what `pip install --user` and pipx's ~/.local/bin give) puts
`peer` where deploy/peer.service runs it. Builds the wheel for real (no dependencies: they are
this interpreter's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whl")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=out)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("peer-*.whl")
    return whl


def source_packages() -> set[str]:
    return {str(p.parent.relative_to(REPO)) for top in ("peer", "protocols", "cli") for p in (REPO / top).rglob("__init__.py")
            if "__pycache__" not in p.parts}


def test_the_wheel_holds_every_package_and_the_command(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert source_packages() >= {"peer", "peer/tasks", "protocols/transport", "cli"}
    assert in_wheel == source_packages()
    modules = {n for n in names if n.endswith(".py")}
    sources = {str(p.relative_to(REPO)) for top in ("peer", "protocols", "cli") for p in (REPO / top).rglob("*.py")}
    assert modules == sources, sorted(sources ^ modules)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "peer = cli.main:main" in entry


def test_a_user_install_puts_peer_where_the_systemd_unit_runs_it(wheel, tmp_path):
    home = tmp_path / "home"
    user_base = home / ".local"
    # the user scheme's layout, as `pip install --user` uses it (a venv refuses --user itself)
    scripts = Path(sysconfig.get_path("scripts", "posix_user", vars={"userbase": str(user_base)}))
    purelib = Path(sysconfig.get_path("purelib", "posix_user", vars={"userbase": str(user_base)}))
    unit = (REPO / "deploy" / "peer.service").read_text()
    (exec_start,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    command = exec_start.split()[0].replace("%h", str(home))
    assert Path(command).parent == scripts, "the unit must run the command from the user-scheme bin dir"

    analyze = shutil.which("systemd-analyze")
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir(mode=0o700)
    if analyze:
        before = subprocess.run([analyze, "verify", "--user", str(REPO / "deploy" / "peer.service")], env=env,
                                capture_output=True, text=True, timeout=60)
        assert before.returncode != 0 and "not executable" in before.stderr, before.stderr

    # --ignore-installed: pip would otherwise uninstall this interpreter's own copy of peer first
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                        "--prefix", str(user_base), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(command).is_file() and os.access(command, os.X_OK)
    if analyze:
        after = subprocess.run([analyze, "verify", "--user", str(REPO / "deploy" / "peer.service")], env=env,
                               capture_output=True, text=True, timeout=60)
        assert after.returncode == 0, after.stderr

    # the installed command runs from the installed packages, not from this checkout
    run_env = {**env, "PYTHONPATH": str(purelib), "PEER_DATA_DIR": str(tmp_path / "data")}
    where = subprocess.run([sys.executable, "-c", "import cli, peer, protocols.transport.peer_id_lookup as m; print(m.__file__)"],
                           env=run_env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.stdout.startswith(str(purelib)), where
    version = subprocess.run([command, "--version"], env=run_env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == "peer 0.1.0", version
    status = subprocess.run([command, "status"], env=run_env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert status.returncode == 1 and "no peer daemon running" in status.stderr, status
