"""The doors of a node: its client port and its /metrics endpoint under connection floods.

Issue #22 ("Hostile input, round two"): a burst of connections from one address, or idle
connections to /metrics, cost the leader its leadership or the node its descriptors. Each test
here starts real node processes and bounds its flood in time.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import bcrypt

from raftcache.certs import make_ca, make_cert
from raftcache.plugins.transport import thrift

WAIT = 5.0

# The module's shared `cluster` (tests/conftest.py).
CLUSTER = {"metrics": True, "storage": "file-wal"}


def raise_nofile(want: int) -> None:
    """This test process's descriptor limit raised towards `want` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def terms(cluster) -> dict[int, int]:
    with cluster.client(timeout=WAIT) as c:
        return {i: c.status(cluster.address(i)).term for i in range(1, cluster.nodes + 1)}


def open_idle(address: str, count: int, source: str) -> list[socket.socket]:
    """`count` non-blocking connects from `source` to `address`, left idle."""
    host, port = thrift.parse_address(address)
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex((host, port))
    except OSError:
        close_all(socks)
        raise
    return socks


def close_all(socks) -> None:
    for s in socks:
        s.close()


def write_within(cluster, key: str, seconds: float) -> float:
    """A write goes through within `seconds` (retrying across a lost leader); its time."""
    started = time.monotonic()
    with cluster.client(timeout=seconds) as c:
        c.set(key, "v")
        assert c.get(key) == b"v"
    took = time.monotonic() - started
    assert took < seconds, f"a write took {took:.1f}s"
    return took


def test_a_burst_of_2000_connections_from_one_address_costs_no_leadership(cluster):
    raise_nofile(2000 + 512)
    for attempt in range(2):
        leader = cluster.wait_for_leader()
        before = terms(cluster)
        idle = open_idle(cluster.address(leader), 2000, "127.0.0.77")
        try:
            time.sleep(1.0)  # the burst is accepted and shed meanwhile
            write_within(cluster, f"burst{attempt}", 2.0)
            time.sleep(0.5)
            assert terms(cluster) == before, f"attempt {attempt}: the term moved"
        finally:
            close_all(idle)
        time.sleep(0.5)


# ---- /metrics ----------------------------------------------------------------------------------
def get(url: str, context=None, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=WAIT, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_6000_idle_connections_to_metrics_cost_no_leadership_and_keep_no_client_out(cluster):
    raise_nofile(6000 + 512)
    leader = cluster.wait_for_leader()
    before = terms(cluster)
    address = cluster.metrics_address(leader)
    idle = []
    try:
        for n in range(6):  # six "hosts", a thousand connections each
            idle += open_idle(address, 1000, f"127.0.0.{80 + n}")
        time.sleep(1.0)
        write_within(cluster, "metrics-flood", 2.0)
        status, text = get(f"http://{address}/metrics")  # a scrape gets in too
        assert status == 200 and "raftcache_term" in text
        assert terms(cluster) == before
    finally:
        close_all(idle)


def test_an_idle_or_dripping_metrics_connection_is_closed_by_its_deadline(running):
    c = running(nodes=1, metrics=True, extra={"metrics": {"request_timeout": 1.0}})
    host, port = thrift.parse_address(c.metrics_address(1))
    for drip in (False, True):
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=WAIT) as s:
            closed = False
            while time.monotonic() - started < 4.0 and not closed:
                try:
                    if drip:
                        s.sendall(b"G")  # a request line that never ends
                    s.settimeout(0.3)
                    closed = s.recv(100) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
        assert closed, f"the {'dripping' if drip else 'idle'} connection was kept open"
        assert time.monotonic() - started < 3.0
    with socket.create_connection((host, port), timeout=WAIT) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 9000)  # a head that never ends
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")


def test_metrics_over_tls_with_basic_auth(running, tmp_path):
    ca_cert, ca_key = make_ca(tmp_path)
    cert, key = make_cert(ca_cert, ca_key, tmp_path, "metrics", hosts=["127.0.0.1"])
    hashed = bcrypt.hashpw(b"right horse", bcrypt.gensalt(10)).decode()
    c = running(nodes=1, metrics=True, extra={"metrics": {
        "tls_server_config": {"cert_file": cert, "key_file": key},
        "basic_auth_users": {"prometheus": hashed}}})
    url = f"https://{c.metrics_address(1)}/metrics"
    trusted = ssl.create_default_context(cafile=ca_cert)
    assert get(url, trusted, ("prometheus", "right horse"))[0] == 200
    assert "raftcache_term" in get(url, trusted, ("prometheus", "right horse"))[1]
    assert get(url, trusted, ("prometheus", "wrong horse"))[0] == 401
    assert get(url, trusted, ("nobody", "right horse"))[0] == 401
    assert get(url, trusted)[0] == 401
    assert get(f"https://{c.metrics_address(1)}/readyz", trusted)[0] == 401
    # Plain HTTP gets no page: the endpoint speaks TLS only.
    try:
        status = get(f"http://{c.metrics_address(1)}/metrics")[0]
    except (OSError, urllib.error.URLError):
        status = None
    assert status != 200
    with c.client(timeout=WAIT) as client:
        assert client.status(c.address(1)).metrics_url.startswith("https://")
    # A flood of wrong passwords (bcrypt runs off the event loop, one check at a time) stalls
    # no write and moves no term; a guess is refused, or closed when its deadline passes
    # while it waits for the check; the right password still gets in meanwhile.
    def guess(n):
        try:
            return get(url, trusted, ("prometheus", f"guess{n}"))[0]
        except (OSError, urllib.error.URLError):
            return None

    before = terms(c)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        wrong = [pool.submit(guess, n) for n in range(16)]
        time.sleep(0.2)
        write_within(c, "during-guesses", 2.0)
        assert get(url, trusted, ("prometheus", "right horse"))[0] == 200
        assert set(f.result() for f in wrong) <= {401, None}
        assert 401 in {f.result() for f in wrong}
    assert terms(c) == before


LOW_NOFILE = 400
LAUNCHER = ["-c", "import resource, runpy, sys; "
                  f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_NOFILE}, {LOW_NOFILE})); "
                  "sys.argv[0] = 'raftcache'; sys.argv.insert(1, 'serve'); "
                  "runpy.run_module('raftcache', run_name='__main__')"]


def test_a_node_with_few_descriptors_survives_a_flood_and_opens_its_files(running):
    raise_nofile(3000 + 512)
    c = running(nodes=1, metrics=True, launcher=LAUNCHER,
                extra={"storage": {"plugin": "file-wal", "options": {"segment_bytes": 4096}},
                       "raft": {"snapshot_entries": 100, "snapshot_keep_entries": 10}})
    assert resource.prlimit(c.processes[1].pid, resource.RLIMIT_NOFILE) == (LOW_NOFILE,) * 2
    wal = os.path.join(c.data_dir, "node1", "wal")
    snapshot = os.path.join(c.data_dir, "node1", "snapshot")
    segments = set(os.listdir(wal))
    assert not os.path.exists(snapshot)
    idle = []
    try:
        for door in (c.address(1), c.metrics_address(1)):
            for n in range(3):
                idle += open_idle(door, 500, f"127.0.0.{90 + n}")
        time.sleep(1.0)
        with c.client(timeout=WAIT) as client:
            for n in range(150):  # past a segment's 4 KiB and raft.snapshot_entries
                client.set(f"k{n}", "v" * 64)
            assert client.get("k149") == b"v" * 64
        status, _ = get(f"http://{c.metrics_address(1)}/healthz")
        assert status == 200
    finally:
        close_all(idle)
    assert c.processes[1].poll() is None, "the node died"
    assert set(os.listdir(wal)) - segments, "no new WAL segment"
    deadline = time.monotonic() + 10
    while not os.path.exists(snapshot) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(snapshot), "no snapshot"
    with open(c.log_path(1), errors="replace") as f:
        log = f.read()
    assert "Too many open files" not in log, log[-2000:]
    # The cap both doors share was derived from the limit, with descriptors kept in reserve.
    assert f"the open-file limit is {LOW_NOFILE} (ulimit -n): admitting 144 client" in log


LISTENER = """
import logging, resource, socket, sys
import gevent, gevent.event
from raftcache.plugins.transport.admission import Admission, Listener
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
kept = []
released = gevent.event.Event()
def handle(sock, addr, slot):
    kept.append(sock)
    try:
        sock.sendall(b"ok")
    except OSError:  # a connection of the flood, closed meanwhile
        pass
    released.wait(30)  # the flood's connections are held open until released below
log = logging.getLogger("listener")
quiet = logging.getLogger("quiet")
quiet.disabled = True  # (it would say the limit is low: stdout carries the port)
admission = Admission(16, 16, quiet)
admission.max_connections = admission.max_per_source = 10**6  # no cap: descriptors run out
server = Listener(("127.0.0.1", 0), admission, handle, log)
server.start()
print(server.address[1], flush=True)
sys.stdin.readline()  # the flood is open
gevent.sleep(1.0)
released.set()
for s in kept:
    s.close()
print("released", len(kept), flush=True)
gevent.sleep(5.0)
"""


def test_a_listener_out_of_descriptors_pauses_and_recovers():
    raise_nofile(200 + 512)
    p = subprocess.Popen([sys.executable, "-c", LISTENER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    idle, lines = [], []
    try:
        port = int(p.stdout.readline())
        idle = open_idle(f"127.0.0.1:{port}", 200, "127.0.0.1")
        p.stdin.write("go\n")
        p.stdin.flush()
        lines = []
        while not lines or not lines[-1].startswith("released"):
            lines.append(p.stdout.readline())
            assert lines[-1], "the listener's process ended"
        close_all(idle)
        idle = []
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            assert s.recv(2) == b"ok"  # accepting again
        assert p.poll() is None
    finally:
        close_all(idle)
        p.kill()
        out = "".join(lines) + p.communicate()[0]
    assert "Too many open files; pausing" in out, out
    assert "Traceback" not in out, out


def test_metrics_config_mistakes_give_one_clear_line(tmp_path):
    from raftcache.node.config import ConfigError, parse

    base = {"node": {"id": 1, "address": "127.0.0.1:7400"},
            "cluster": {"peers": {"1": "127.0.0.1:7400"}}}
    cases = [
        ({"basic_auth_users": {"prometheus": "hunter2"}},
         "metrics.basic_auth_users.prometheus: expected a bcrypt hash"),
        ({"tls_server_config": {"cert_file": str(tmp_path / "none.pem"),
                                "key_file": str(tmp_path / "none.pem")}},
         "metrics.tls_server_config.cert_file: "),
        ({"request_timeout": 0}, "metrics.request_timeout: must be between 0 and 300"),
        ({"web_config": "web.yml"}, "metrics.web_config: unknown key"),
    ]
    for section, message in cases:
        try:
            parse({**base, "metrics": section}, "node.toml")
        except ConfigError as exc:
            assert message in str(exc), str(exc)
        else:
            raise AssertionError(f"{section} was accepted")
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
    assert parse({**base, "metrics": {"basic_auth_users": {"p": hashed}}}).metrics \
        .basic_auth_users == {"p": hashed}


def test_admission_evicts_the_least_recently_active_idle_connection():
    import logging

    from raftcache.plugins.transport.admission import Admission

    closed = []
    adm = Admission(1000, 3, logging.getLogger("test"))
    a, b, c = (adm.admit("10.0.0.1", lambda n=n: closed.append(n)) for n in "abc")
    adm.begin(a)
    adm.end(a)  # a was active last: b is now the longest idle
    adm.begin(c)  # c is busy: never evicted
    d = adm.admit("10.0.0.1", lambda: closed.append("d"))
    assert closed == ["b"] and d is not None
    e = adm.admit("10.0.0.1", lambda: closed.append("e"))
    assert closed == ["b", "a"] and e is not None
    adm.begin(d)
    adm.begin(e)
    assert adm.admit("10.0.0.1", lambda: None) is None  # all busy: refused at once
    assert adm.admit("10.0.0.2", lambda: None) is not None  # another source is not
