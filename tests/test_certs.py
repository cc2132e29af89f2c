"""raftcache.certs: a CA, node and client certificates, written with safe modes."""

import datetime
import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftcache import certs


def load(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_certs_writes_everything_with_private_keys_0600(tmp_path):
    paths = certs.init_certs(tmp_path / "pki", nodes=3)
    expected = {"dir", "ca", "ca_key", "client", "client_key"}
    expected |= {f"node{i}{suffix}" for i in (1, 2, 3) for suffix in ("", "_key")}
    assert set(paths) == expected
    for name, path in paths.items():
        if name == "dir":
            continue
        assert os.path.isfile(path)
        if name.endswith("_key"):
            assert mode(path) == 0o600, name
            assert open(path).read().startswith("-----BEGIN PRIVATE KEY-----")
        else:
            assert mode(path) == 0o644, name
    assert paths["node2"] == str(tmp_path / "pki" / "node2.pem")
    assert paths["node2_key"] == str(tmp_path / "pki" / "node2-key.pem")


def test_certificates_chain_to_the_ca_with_the_right_names_and_usages(tmp_path):
    paths = certs.init_certs(tmp_path, nodes=2, extra_ips=("10.1.2.3",))
    ca = load(paths["ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("node1", "node2", "client"):
        cert = load(paths[name])
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    node = load(paths["node1"])
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address(f"127.0.0.{i}") for i in range(1, 17)} <= ips
    assert ipaddress.ip_address("10.1.2.3") in ips
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    node_eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(node_eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    client_eku = load(paths["client"]).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert list(client_eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_the_stdlib_loads_them(tmp_path):
    paths = certs.init_certs(tmp_path, nodes=1)
    tls = certs.tls_config(tmp_path, "node1")
    assert (tls.ca, tls.cert, tls.key) == (paths["ca"], paths["node1"], paths["node1_key"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_verify_locations(tls.ca)
    ctx.load_cert_chain(tls.cert, tls.key)


def test_an_existing_ca_is_not_replaced_by_accident(tmp_path):
    first = certs.init_certs(tmp_path, nodes=1)
    ca_pem = open(first["ca"]).read()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        certs.init_certs(tmp_path, nodes=1)
    assert open(first["ca"]).read() == ca_pem
    certs.init_certs(tmp_path, nodes=1, overwrite=True)
    assert open(first["ca"]).read() != ca_pem


def test_a_rewritten_key_gets_0600_even_if_the_file_was_looser(tmp_path):
    paths = certs.init_certs(tmp_path, nodes=1)
    os.chmod(paths["client_key"], 0o644)
    certs.make_cert(paths["ca"], paths["ca_key"], tmp_path, "client", server=False)
    assert mode(paths["client_key"]) == 0o600


def test_make_cert_can_make_expired_and_foreign_certificates(tmp_path):
    paths = certs.init_certs(tmp_path / "pki", nodes=1)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = certs.make_cert(paths["ca"], paths["ca_key"], tmp_path / "bad", "expired",
                                not_after=now - datetime.timedelta(days=1))
    assert mode(key) == 0o600
    expired = load(cert)
    assert expired.not_valid_after_utc < now
    assert expired.not_valid_before_utc < expired.not_valid_after_utc
    expired.verify_directly_issued_by(load(paths["ca"]))

    other_ca, other_ca_key = certs.make_ca(tmp_path / "other", common_name="someone else")
    foreign, _ = certs.make_cert(other_ca, other_ca_key, tmp_path / "other", "client")
    with pytest.raises(ValueError):  # issuer name mismatch
        load(foreign).verify_directly_issued_by(load(paths["ca"]))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        certs.init_certs(tmp_path, nodes=0)
    paths = certs.init_certs(tmp_path / "pki", nodes=1)
    with pytest.raises(ValueError):
        certs.make_cert(paths["ca"], paths["ca_key"], tmp_path, "x", server=False, client=False)
