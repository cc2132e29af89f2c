"""Certificates for mutual TLS: a cluster CA, one certificate per node and one for clients.

`init_certs(dir)` writes, for `nodes=3`::

    ca.pem  ca-key.pem            the cluster CA (signs everything below)
    node1.pem  node1-key.pem ...  node N: CN "nodeN", serverAuth + clientAuth (nodes call peers)
    client.pem  client-key.pem    CN "client", clientAuth only (cannot pose as a server)

Keys are EC P-256 in unencrypted PKCS#8 PEM, created with mode 0600. Node certificates name
127.0.0.1-127.0.0.16 and localhost, so tests can give each node or relay its own loopback
address; pass `extra_ips`/`hosts` for more. The tcp-tls transport accepts Raft messages only
from a certificate whose CN is "node<id>" of the sending node, so node N must use nodeN.pem.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftcache.pluginapi import write_private

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
LOOPBACK_IPS = 16  # 127.0.0.1 .. 127.0.0.16 in every node certificate
_SKEW = datetime.timedelta(minutes=5)  # not_before in the past: tolerate clock skew


def node_name(node_id: int) -> str:
    """The file stem and CN of node `node_id`'s certificate."""
    return f"node{node_id}"


def tls_config(directory, name: str):
    """The TLSConfig for `name` ("node1", "client", ...) in a directory made by init_certs."""
    from raftcache.pluginapi import TLSConfig

    d = os.fspath(directory)
    return TLSConfig(ca=os.path.join(d, "ca.pem"), cert=os.path.join(d, f"{name}.pem"),
                     key=os.path.join(d, f"{name}-key.pem"))


def init_certs(directory, nodes: int = 3, hosts: Iterable[str] = DEFAULT_HOSTS,
               days: int = 365, extra_ips: Iterable[str] = (), loopback_ips: int = LOOPBACK_IPS,
               overwrite: bool = False) -> dict[str, str]:
    """Create a CA, `nodes` node certificates and a client certificate in `directory`.

    Returns paths: "dir", "ca", "ca_key", "node1", "node1_key", ..., "client", "client_key".
    Refuses (FileExistsError) to replace an existing CA unless `overwrite`: a new CA would
    silently lock out every certificate issued by the old one.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    d = os.fspath(directory)
    os.makedirs(d, mode=0o700, exist_ok=True)
    if not overwrite:
        for stem in ("ca.pem", "ca-key.pem"):
            if os.path.exists(os.path.join(d, stem)):
                raise FileExistsError(f"{os.path.join(d, stem)} exists; pass overwrite=True "
                                      "(certificates signed by the old CA would stop working)")
    names = list(hosts) + list(extra_ips)
    names += [f"127.0.0.{i}" for i in range(1, loopback_ips + 1)]
    ca_cert, ca_key = make_ca(d, days=max(days, 1))
    paths = {"dir": d, "ca": ca_cert, "ca_key": ca_key}
    for i in range(1, nodes + 1):
        name = node_name(i)
        paths[name], paths[f"{name}_key"] = make_cert(ca_cert, ca_key, d, name, hosts=names,
                                                      days=days)
    paths["client"], paths["client_key"] = make_cert(ca_cert, ca_key, d, "client", hosts=(),
                                                     server=False, days=days)
    return paths


def add_node_cert(directory, node_id: int, extra_hosts: Iterable[str] = (),
                  days: int = 365) -> tuple[str, str]:
    """A certificate for node `node_id` (one that joins later), signed by the CA that
    `init_certs` made in `directory`, naming what init's node certificates name plus
    `extra_hosts`. Refuses (FileExistsError) to replace one that exists."""
    if node_id < 1:
        raise ValueError(f"node ids start at 1, got {node_id}")
    d = os.fspath(directory)
    name = node_name(node_id)
    if os.path.exists(os.path.join(d, f"{name}.pem")):
        raise FileExistsError(f"{os.path.join(d, name)}.pem exists")
    for stem in ("ca.pem", "ca-key.pem"):
        if not os.path.exists(os.path.join(d, stem)):
            raise FileNotFoundError(f"{os.path.join(d, stem)}: no CA here (raftcache certs init)")
    hosts = [*DEFAULT_HOSTS, *extra_hosts, *(f"127.0.0.{i}" for i in range(1, LOOPBACK_IPS + 1))]
    return make_cert(os.path.join(d, "ca.pem"), os.path.join(d, "ca-key.pem"), d, name,
                     hosts=hosts, days=days)


def make_ca(directory, name: str = "ca", common_name: str = "raftcache cluster CA",
            days: int = 3650) -> tuple[str, str]:
    """A self-signed CA: returns (cert path, key path) = <name>.pem, <name>-key.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "raftcache"),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(os.fspath(directory), name, cert, key)


def make_cert(ca_cert, ca_key, directory, name: str, *, common_name: str | None = None,
              hosts: Iterable[str] = DEFAULT_HOSTS, server: bool = True, client: bool = True,
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None,
              days: int = 365) -> tuple[str, str]:
    """A leaf certificate signed by the CA; returns (cert path, key path).

    `ca_cert`/`ca_key` are paths or loaded objects. `server`/`client` pick the extended key
    usages. `not_after` in the past makes an expired certificate (for tests).
    """
    ca_cert = _load_cert(ca_cert)
    ca_key = _load_key(ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    if not_after is None:
        not_after = now + datetime.timedelta(days=days)
    if not_before is None:
        not_before = min(now - _SKEW, not_after - datetime.timedelta(days=1))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
             ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    if not usages:
        raise ValueError("a certificate must allow server or client use")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "raftcache"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name or name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    alt_names = _alt_names(hosts)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write_pair(os.fspath(directory), name, cert, key)


# ---- helpers ------------------------------------------------------------------------------------
def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def _alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen = set()
    for host in hosts:
        if host in seen:
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _load_cert(cert) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    with open(cert, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _load_key(key):
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    with open(key, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def _write_pair(directory: str, name: str, cert: x509.Certificate, key) -> tuple[str, str]:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}-key.pem")
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                  mode=0o644)
    return cert_path, key_path


