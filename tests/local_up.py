"""`raftcache up` run as a user runs it, for the tests that drive it end to end."""

import subprocess
import sys
import time

from raftcache.cluster import free_port_block


def up(tmp_path, *args, timeout: float = 40.0):
    """Start `raftcache up` on free ports with its data under tmp_path/data; return the process,
    its base port, and what it printed up to its "leader:" line (or its exit)."""
    # One block for both: two blocks asked for one after the other may overlap, since
    # neither is bound until the nodes start.
    port = free_port_block(6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raftcache", "up", "--port", str(port), "--data-dir",
         str(tmp_path / "data"), "--leader-timeout", "20",
         "--metrics-port", str(port + 3), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("leader:") or not line:
            break
    return proc, port, "".join(lines)
