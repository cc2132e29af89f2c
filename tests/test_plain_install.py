"""What `pip install raftcache` gets, without extras: every command's help, and a progress bar.

The test extra brings libraries the product imports too (rich, through import-linter), so a
test run in .venv cannot show that install_requires is complete: this installs the checkout
into a fresh virtual environment (no system site-packages) and runs the command there.
"""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Run in the fresh environment with -I: neither the working directory (this checkout) nor
# PYTHONPATH may stand in for what was installed.
WALK_HELP = """
import argparse, contextlib, io, json, sys
import raftcache
from raftcache import cli

def commands(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + [name])

results = {"module": raftcache.__file__, "help": {}}
for path in commands(cli.build_parser(), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = cli.main([*path, "--help"])
        except SystemExit as exc:
            code = exc.code
    results["help"][" ".join(path)] = [code, out.getvalue()]
print(json.dumps(results))
"""


def run(args, timeout, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args[:4]}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def source_copy(target: Path) -> Path:
    """The checkout's files as they are (uncommitted changes too), without the virtualenv,
    git's data or build output: pip builds in the source tree, which must stay clean."""
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    return target


def fresh_install(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    # Dependencies from the pip cache or PyPI, as a user's install gets them.
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(source_copy(tmp_path / "src"))], timeout=900)
    return venv


def backup_file(path: Path) -> Path:
    """A backup of an empty cache, made as `snapshot save` makes one (raftcache.backup)."""
    import hashlib
    import struct

    from raftcache import backup
    from raftcache.core.cache.statemachine import StateMachine
    from raftcache.plugins.backend.memory import MemoryBackend

    image = StateMachine(MemoryBackend()).snapshot()
    header = json.dumps({"index": 5, "term": 2, "size": len(image), "taken": "now",
                         "sha256": hashlib.sha256(image).hexdigest()}).encode()
    path.write_bytes(backup.MAGIC + bytes([backup.VERSION]) + struct.pack(">I", len(header))
                     + header + image)
    return path


def run_on_a_terminal(args, timeout: float, cwd) -> tuple[int, str, str]:
    """(exit code, what it wrote to its terminal, its stderr): `args` with stdin and stdout
    on a pseudo-terminal, so that it draws its progress bars as for a user."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE,
                            cwd=cwd, env=env)
    os.close(terminal)
    screen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        proc.kill()
        os.close(controller)
    return proc.returncode, screen.decode(errors="replace"), stderr.decode(errors="replace")


@pytest.mark.slow
def test_a_plain_install_runs_every_command_and_draws_a_progress_bar(tmp_path):
    venv = fresh_install(tmp_path)
    python, raftcache = venv / "bin" / "python", venv / "bin" / "raftcache"

    walked = json.loads(run([str(python), "-I", "-c", WALK_HELP], timeout=300,
                            cwd=tmp_path).stdout)
    assert Path(walked["module"]).is_relative_to(venv), walked["module"]  # not this checkout
    helps = walked["help"]
    assert {"", "serve", "snapshot restore", "token inspect", "bench"} <= set(helps)
    for command, (code, text) in helps.items():
        assert code == 0 and text.startswith("usage: raftcache"), (command, code, text)
    # The console script itself, as a user types it.
    assert run([str(raftcache), "--help"], timeout=120, cwd=tmp_path).stdout == helps[""][1]

    # `snapshot restore` on a terminal: a rich progress bar while it seeds the nodes.
    backup = backup_file(tmp_path / "empty.backup")
    code, screen, stderr = run_on_a_terminal(
        [str(raftcache), "snapshot", "restore", str(backup), "--data-dir",
         str(tmp_path / "restored"), "--nodes", "3", "--storage", "file-wal"],
        timeout=120, cwd=tmp_path)
    assert code == 0, (screen, stderr)
    assert "nodes seeded" in screen and "━" in screen and "100%" in screen, screen  # rich
    assert "restored index 5 (term 2" in screen, screen
