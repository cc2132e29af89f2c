"""`write_private`, the one way raftcache writes keys, secrets, tokens, keyrings, configs and
backups: owner-only from the first byte whatever the umask, atomic, and never written through
something planted at a predictable name; and `tighten_data_dir`, what `up` does to an
existing data directory."""

import os
import stat

import pytest

from raftcache.cluster import tighten_data_dir
from raftcache.pluginapi import write_private


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.fixture
def fsynced(monkeypatch):
    """(path, mode) of every regular file fsynced, at the moment it is fsynced."""
    seen = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            seen.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_IMODE(st.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_owner_only_from_the_first_byte_whatever_the_umask(tmp_path, umask_zero, fsynced):
    path = tmp_path / "secret"
    write_private(str(path), [b"part one, ", b"part two"])
    assert path.read_bytes() == b"part one, part two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Written and fsynced under a fresh name in the same directory, already 0600.
    [(written, mode)] = fsynced
    assert os.path.dirname(written) == str(tmp_path) and written != str(path)
    assert mode == 0o600
    assert sorted(os.listdir(tmp_path)) == ["secret"]  # no temporary left


def test_a_planted_tmp_file_or_symlink_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    os.symlink(victim, tmp_path / "secret.tmp")
    (tmp_path / ".secret.tmp").write_bytes(b"planted")
    write_private(str(tmp_path / "secret"), b"key material")
    assert victim.read_bytes() == b"untouched"
    assert (tmp_path / ".secret.tmp").read_bytes() == b"planted"
    assert (tmp_path / "secret").read_bytes() == b"key material"


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    os.symlink(victim, tmp_path / "secret")
    write_private(str(tmp_path / "secret"), b"key material")
    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "secret").is_symlink()
    assert (tmp_path / "secret").read_bytes() == b"key material"


def test_without_replace_an_existing_file_is_kept(tmp_path):
    path = tmp_path / "keyring"
    write_private(str(path), b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_private(str(path), b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["keyring"]


def test_a_public_file_gets_its_mode_before_its_name(tmp_path, umask_zero, fsynced):
    write_private(str(tmp_path / "ca.pem"), b"cert", mode=0o644)
    assert [mode for _, mode in fsynced] == [0o644]
    assert stat.S_IMODE((tmp_path / "ca.pem").stat().st_mode) == 0o644


def test_every_secret_writer_goes_through_it(tmp_path, umask_zero, fsynced):
    from raftcache.certs import init_certs
    from raftcache.node.config import write_secret
    from raftcache.plugins.security.encryption import make_keyring
    from raftcache.plugins.security.tokens import init_auth_dir

    write_secret(str(tmp_path / "cluster.secret"))
    make_keyring(str(tmp_path / "keyring"))
    init_auth_dir(str(tmp_path / "auth"))
    init_certs(str(tmp_path / "certs"), nodes=1)
    private = {"cluster.secret", "keyring", "signing.key", "admin.token", "ca-key.pem",
               "node1-key.pem", "client-key.pem"}
    by_name = {}
    for written, mode in fsynced:  # the temporary names: .<name>.<random>.tmp
        by_name[os.path.basename(written)[1:].rsplit(".", 2)[0]] = mode
    assert private <= set(by_name), sorted(by_name)
    assert all(by_name[name] == 0o600 for name in private), by_name
    for root, _dirs, files in os.walk(tmp_path):
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode == (0o600 if name in private else 0o644), (name, mode)


def test_an_existing_loose_data_dir_is_tightened_with_a_message(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    message = tighten_data_dir(str(data))
    assert message and "from mode 0755 to 0700" in message and str(data) in message
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert tighten_data_dir(str(data)) is None  # already private: nothing to say
    assert tighten_data_dir(str(tmp_path / "missing")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another uid owns")
def test_a_data_dir_another_user_owns_is_refused(tmp_path):
    data = tmp_path / "theirs"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    with pytest.raises(ValueError, match="belongs to uid 65534"):
        tighten_data_dir(str(data))
