"""Options: how a plugin reads its ``options`` table, checked by the same rules as the rest of
a node's config (unknown keys, types, refusals name the key); and small helpers for options."""

from __future__ import annotations

import os
import tempfile
import types
import typing
import urllib.parse

import attrs

from .errors import ConfigError, OptionError


def positive(_instance, attribute, value) -> None:
    """An attrs validator: the option must be a number > 0 (seconds, sizes, counts)."""
    if not value > 0:
        raise OptionError(attribute.name, f"expected a number > 0, got {value!r}")


def write_private(path: str, data: bytes | str | list[bytes], *, mode: int = 0o600,
                  replace: bool = True) -> str:
    """Write `data` (bytes, text, or a list of bytes written one after another) to `path`
    atomically, readable by its owner only from the first byte: into a new, randomly named
    file in the same directory (`tempfile.mkstemp`: O_CREAT|O_EXCL, mode 0600 whatever the
    umask), fsynced, then renamed over `path` (`replace`) or hard-linked to it (not
    `replace`: FileExistsError when something is there, which is kept), and the directory
    fsynced. Nothing at a predictable temporary name is ever written through, and a symlink
    at `path` is replaced, not followed. `mode` may open the file up (a certificate's 0644)
    before it gets its name. The one way raftcache writes keys, secrets, tokens, keyrings,
    configs and backups. Returns `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    parts = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) \
        else data
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and never clobbers
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def redact_url(url: str) -> str:
    """A server URL without its password, for messages and logs."""
    p = urllib.parse.urlsplit(url)
    if p.password is None:
        return url
    netloc = f"{p.username or ''}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit(p._replace(netloc=netloc))


_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", dict: "a table",
               list: "an array", float: "a number"}


def _where(path: str | None, key: str) -> str:
    return f"{path}: {key}" if path else key


def build(cls, data, path: str | None, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(path, prefix or '(top)')}: expected a table")
    fields = {f.name: f for f in attrs.fields(cls) if f.name != "path"}
    for key in data:
        if key not in fields:
            accepted = ", ".join(sorted(fields))
            raise ConfigError(f"{_where(path, prefix + str(key))}: unknown key "
                              f"(accepted: {accepted})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if field.default is attrs.NOTHING:
                raise ConfigError(f"{_where(path, key)}: missing (required)")
            continue
        kwargs[name] = _convert(hints[name], data[name], path, key)
    return cls(**kwargs)


def parse_options(cls, options: dict | None, key: str):
    """A plugin's options (``[storage] options = {...}`` and alike) as the attrs class `cls`,
    checked like the rest of a node's config: an unknown key, a wrong type or a value the class
    refuses raises ConfigError naming the key (`key` is where the options sit, e.g.
    "storage.options") and what is accepted. The class refuses a value by raising OptionError
    (or ValueError) from a converter, validator or ``__attrs_post_init__``."""
    try:
        return build(cls, dict(options or {}), None, key + ".")
    except OptionError as exc:
        raise ConfigError(f"{key}.{exc.option}: {exc.problem}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _convert(hint, value, path: str, key: str):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0]
    if attrs.has(hint):
        return build(hint, value, path, key + ".")
    expected = hint if hint in _TYPE_NAMES else None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is not None and (
        not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{_where(path, key)}: expected {_TYPE_NAMES[expected]}, got {value!r}")
    return value


def private_dir(path: str) -> str:
    """Make directory `path` and any missing parents owner-only (0700, whatever the umask);
    directories already there are left as they are. Returns `path`."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
    return missing[0] if missing else path
