"""Values encrypted at rest: the ``encryption`` value codec, its keyring and the ``keys-*``
admin actions (docs/security.md, "Encryption at rest").

Keyring file (JSON, mode 0600, the same on every node of a cluster; `raftcache keys init`)::

    {"format": "raftcache-keyring", "version": 1,
     "master": {"id": 1, "key": "<32 random bytes, base64>"}}

Data keys seal the values. Key 0 is derived from the master key (HKDF-SHA256), so a new
cluster needs nothing in its log. ``raftcache keys rotate`` draws key n+1 at the leader and
commits it wrapped with the master key as the replicated setting ``keys.<n>``::

    wrapped := 0x01 | master id u32 BE | nonce 12 | AES-256-GCM(master, nonce, data key,
               aad = "raftcache-data-key-1" | master id | n)

The active data key is the highest id among them; older ones stay, so older values still
open. A sealed value, as the node that takes the write seals it (and the log holds it)::

    blob := 0xE2 | key id u32 BE | nonce 12 | AES-256-GCM(data key, nonce, value,
            aad = "raftcache-value-1" | 0xE2 | key id | cache key)

The cache key in the associated data makes a value copied under another key fail to open; the
nonce is random for every seal. A value's version (the log index of the entry that writes it)
is not known when it is sealed, so the state machine binds it when the entry applies
(`bind`): what the backend and the snapshots hold is ::

    stored := blob | HMAC-SHA256(binding key, "raftcache-version-1" | version u64 BE |
                                 key length u32 BE | cache key | blob)[:16]

with the binding key derived from the master key (HKDF-SHA256). A read checks it against the
catalog's version (`unbind`), so an older value put back, or a value moved to another key, is
refused like an altered one. Values stored before this format (0xE1, unbound) still open;
the reseal sweep rewrites them bound.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import struct
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftcache.core.cache.statemachine import decode_value, encode_value
from raftcache.pluginapi import (
    BackendUnavailable,
    ConfigError,
    Configure,
    ValueCodecError,
    hookimpl,
    write_private,
)

if TYPE_CHECKING:
    from raftcache.node.config import Config

KEYRING_FORMAT = "raftcache-keyring"
KEYRING_VERSION = 1
MAGIC = 0xE2  # a blob whose stored form is bound to its version
LEGACY_MAGIC = 0xE1  # stored unbound (sealed before the binding): opens, the sweep reseals it
_HEADER = struct.Struct(">BI")  # magic, data key id
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = _HEADER.size + NONCE_BYTES + TAG_BYTES  # 33 bytes a sealed value adds
BINDING_BYTES = 16  # what binding a stored value to its version adds
_BINDING_AAD = b"raftcache-version-1"
_BINDING = struct.Struct(">QI")  # version, key length
_VALUE_AAD = b"raftcache-value-1"
_WRAP_AAD = b"raftcache-data-key-1"
_WRAP_VERSION = 1
_WRAPPED = struct.Struct(">BI")  # wrap version, master key id
SETTING_PREFIX = "keys."
# Set (once, by `keys-require-bound`) when no value is stored unbound any more: from then on
# an unbound (0xE1) value is refused, so one kept from before the binding cannot be put back.
BOUND_SETTING = "keys.bound"
MAX_KEY_ID = (1 << 32) - 1
SEAL_COUNTS = "seal-counts.json"  # in the node's data dir: seals made per data key
RESEAL_PAGE = 256  # keys a keys-reseal call reads at a time
RESEAL_SCAN = 4096  # keys one keys-reseal call looks at, at most, before it answers
STATUS_LIMIT = 100_000  # keys-status counts values by key id up to this many keys


class KeyringError(ConfigError):
    """A keyring file that cannot be used (missing, readable by others, malformed)."""


# ================================================================================================
# The keyring file
# ================================================================================================
class Keyring:
    """The master key (`id`, 32 bytes) of a keyring file."""

    def __init__(self, master_id: int, master_key: bytes, path: str = ""):
        if not 0 <= master_id <= MAX_KEY_ID or len(master_key) != 32:
            raise ValueError("a master key is 32 bytes with an id in [0, 2**32)")
        self.master_id = master_id
        self.master_key = master_key
        self.path = path


def make_keyring(path: str, master_id: int = 1) -> Keyring:
    """A new keyring file at `path` (mode 0600, 32 random bytes); FileExistsError when one is
    there: a keyring is never replaced (what it sealed could no longer be read)."""
    key = os.urandom(32)
    body = {"format": KEYRING_FORMAT, "version": KEYRING_VERSION,
            "master": {"id": master_id, "key": base64.b64encode(key).decode()}}
    write_private(path, json.dumps(body, indent=2) + "\n", replace=False)
    return Keyring(master_id, key, path)


def read_keyring(path: str, config: Config | None = None) -> Keyring:
    """The keyring in `path`; KeyringError (a ConfigError naming ``encryption.keyring`` when
    `config` is given) when it is missing, readable by group or others, or malformed."""
    def fail(problem: str) -> KeyringError:
        message = f"{path}: {problem}"
        if config is not None:
            message = f"{config.path}: encryption.keyring: {message}"
        return KeyringError(message)

    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(1 << 16)
    except FileNotFoundError:
        raise fail(f"no such keyring file (`raftcache keys init {path}` makes one; "
                   "`raftcache up` makes DATA_DIR/keyring)") from None
    except OSError as exc:
        raise fail(f"cannot read the keyring: {exc.strerror}") from None
    if mode & 0o077:
        raise fail(f"the keyring is readable by others (mode {mode & 0o777:04o}); "
                   f"chmod 600 {path}")
    try:
        body = json.loads(raw)
        if body.get("format") != KEYRING_FORMAT:
            raise ValueError(f"not a raftcache keyring (format {body.get('format')!r})")
        if body.get("version") != KEYRING_VERSION:
            raise ValueError(f"keyring version {body.get('version')!r} (this build reads "
                             f"{KEYRING_VERSION})")
        master = body["master"]
        master_id = master["id"]
        if type(master_id) is not int:
            raise ValueError("master.id must be an integer")
        key = base64.b64decode(master["key"], validate=True)
        return Keyring(master_id, key, path)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise fail(f"malformed keyring: {exc}") from None


# ================================================================================================
# The codec
# ================================================================================================
def key_id_of(blob: bytes) -> int | None:
    """The data key id a sealed blob (or its stored form) names, or None when it is not one."""
    if len(blob) < OVERHEAD or blob[0] not in (MAGIC, LEGACY_MAGIC):
        return None
    return _HEADER.unpack_from(blob)[1]


def setting_name(key_id: int) -> str:
    return f"{SETTING_PREFIX}{key_id}"


def data_key_ids(settings: Mapping) -> list[int]:
    """The ids of the data keys in the replicated settings, and 0 (derived)."""
    ids = {0}
    for name in settings:
        if name.startswith(SETTING_PREFIX) and name[len(SETTING_PREFIX):].isdigit():
            ids.add(int(name[len(SETTING_PREFIX):]))
    return sorted(ids)


def master_ids(settings: Mapping) -> list[int]:
    """The ids of the master keys that wrap the data keys in the replicated settings (none
    before the first rotation: data key 0 is derived from the master key, not recorded)."""
    ids = set()
    for key_id in data_key_ids(settings)[1:]:
        wrapped = settings[setting_name(key_id)].value
        if len(wrapped) >= _WRAPPED.size:
            ids.add(_WRAPPED.unpack_from(wrapped)[1])
    return sorted(ids)


class EncryptionCodec:
    """Seals values with the active data key; opens them with the key their blob names.

    `settings()` returns the replicated settings (``node.settings``) where wrapped data keys
    live; `plaintext(key)`, when given, says whether `key`'s backend route opted out.
    `rotate_after`: seals with one data key after which `rotation` asks for a new one; the
    count is kept in `counts_path` (when given) a block ahead, so a restart never counts less.
    """

    def __init__(self, keyring: Keyring, settings: Callable[[], Mapping],
                 plaintext: Callable[[bytes], bool] | None = None,
                 rotate_after: int = 1 << 26, counts_path: str = ""):
        self.keyring = keyring
        self._settings = settings
        self._plaintext = plaintext
        self.rotate_after = rotate_after
        self.sealed = SealCounts(counts_path, keyring.master_id,
                                 block=max(1, min(1 << 16, rotate_after // 64)))
        self._master = AESGCM(keyring.master_key)
        derived = HKDF(hashes.SHA256(), 32, salt=None,
                       info=b"raftcache data key 0|master %d" % keyring.master_id)
        self._keys: dict[int, tuple[bytes | None, AESGCM]] = {
            0: (None, AESGCM(derived.derive(keyring.master_key)))}
        self._active = 0
        self._binding_key = HKDF(hashes.SHA256(), 32, salt=None,
                                 info=b"raftcache version binding|master %d"
                                 % keyring.master_id).derive(keyring.master_key)

    # -- data keys ---------------------------------------------------------------------------
    def active_id(self) -> int:
        """The highest data key id in the settings (0: the derived key). Rotation adds ids one
        at a time, so this checks the one it knows and looks one further."""
        settings = self._settings()
        active = self._active
        if active and setting_name(active) not in settings:  # settings went back (a rebuild)
            active = data_key_ids(settings)[-1]
        while setting_name(active + 1) in settings:
            active += 1
        self._active = active
        return active

    def _aead(self, key_id: int) -> AESGCM:
        if key_id == 0:
            return self._keys[0][1]
        setting = self._settings().get(setting_name(key_id))
        cached = self._keys.get(key_id)
        if setting is None:
            known = ", ".join(map(str, data_key_ids(self._settings())))
            raise ValueCodecError(f"sealed with data key {key_id}, which this node does not "
                                  f"know (known: {known})")
        if cached is not None and cached[0] == setting.value:
            return cached[1]
        aead = AESGCM(self.unwrap(key_id, setting.value))
        self._keys[key_id] = (setting.value, aead)
        return aead

    def new_key(self) -> Configure:
        """The entry that adds a new data key (the next id), wrapped; it becomes active."""
        new_id = data_key_ids(self._settings())[-1] + 1
        if new_id > MAX_KEY_ID:
            raise ValueError("no data key id left")
        return Configure(((setting_name(new_id), self.wrap(new_id, os.urandom(32))),))

    def rotation(self) -> Configure | None:
        """A new data key to commit when this node has sealed `rotate_after` values with the
        active one (random nonces: their chance of colliding grows with the count), else
        None. The leader asks every second (`Replica`) and proposes it."""
        if self.sealed.count(self.active_id()) < self.rotate_after:
            return None
        return self.new_key()

    def wrap(self, key_id: int, data_key: bytes) -> bytes:
        header = _WRAPPED.pack(_WRAP_VERSION, self.keyring.master_id)
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._master.encrypt(nonce, data_key,
                                                     self._wrap_aad(key_id))

    def _wrap_aad(self, key_id: int) -> bytes:
        return b"%s|%d|%d" % (_WRAP_AAD, self.keyring.master_id, key_id)

    def unwrap(self, key_id: int, wrapped: bytes) -> bytes:
        if len(wrapped) < _WRAPPED.size + NONCE_BYTES + TAG_BYTES + 32:
            raise ValueCodecError(f"data key {key_id} in the settings is malformed")
        version, master_id = _WRAPPED.unpack_from(wrapped)
        if version != _WRAP_VERSION or master_id != self.keyring.master_id:
            raise ValueCodecError(
                f"data key {key_id} is wrapped with master key {master_id}, this node's "
                f"keyring ({self.keyring.path}) holds master key {self.keyring.master_id}")
        nonce = wrapped[_WRAPPED.size:_WRAPPED.size + NONCE_BYTES]
        try:
            return self._master.decrypt(nonce, wrapped[_WRAPPED.size + NONCE_BYTES:],
                                        self._wrap_aad(key_id))
        except InvalidTag:
            raise ValueCodecError(
                f"data key {key_id} does not unwrap with this node's master key "
                f"{self.keyring.master_id} ({self.keyring.path}): is its keyring the same "
                "file as the other nodes'?") from None

    # -- ValueCodec ----------------------------------------------------------------------------
    def encode(self, key: bytes, value: bytes) -> bytes:
        if self._plaintext is not None and self._plaintext(key):
            return value
        return self.seal(key, value, self.active_id())

    def decode(self, key: bytes, blob: bytes) -> bytes:
        if self._plaintext is not None and self._plaintext(key):
            return blob
        return self.open(key, blob)

    # -- the version binding (called by the state machine) ------------------------------------
    def bind(self, key: bytes, version: int, blob: bytes) -> bytes:
        """`blob` as stored at `version`: with a tag binding it to the key and the version."""
        if self._plaintext is not None and self._plaintext(key):
            return blob
        return blob + self._binding(key, version, blob)

    def unbind(self, key: bytes, version: int, stored: bytes) -> bytes:
        """The blob in `stored`, once its tag proves it was stored under `key` at `version`;
        ValueCodecError otherwise (an older value put back, or one from another key)."""
        if self._plaintext is not None and self._plaintext(key):
            return stored
        if stored[:1] == bytes((LEGACY_MAGIC,)):
            if BOUND_SETTING in self._settings():
                raise ValueCodecError(
                    f"the stored value of {key!r} was stored before values were bound to "
                    "their version, and this cluster requires them bound (keys.bound): it "
                    "was put back from an older copy")
            return stored  # sealed before the binding: the sweep rewrites it
        blob, tag = stored[:-BINDING_BYTES], stored[-BINDING_BYTES:]
        if len(stored) < BINDING_BYTES or not hmac.compare_digest(
                tag, self._binding(key, version, blob)):
            raise ValueCodecError(f"the stored value of {key!r} is not the one written at "
                                  f"version {version}: it was replaced (an older value put "
                                  "back?), altered, or moved from another key")
        return blob

    def _binding(self, key: bytes, version: int, blob: bytes) -> bytes:
        mac = hmac.new(self._binding_key, _BINDING_AAD, "sha256")
        mac.update(_BINDING.pack(version, len(key)))
        mac.update(key)
        mac.update(blob)
        return mac.digest()[:BINDING_BYTES]

    def seal(self, key: bytes, value: bytes, key_id: int) -> bytes:
        header = _HEADER.pack(MAGIC, key_id)
        self.sealed.add(key_id)  # before the nonce is used: a crash never undercounts
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._aead(key_id).encrypt(nonce, value,
                                                           _VALUE_AAD + header + key)

    def open(self, key: bytes, blob: bytes) -> bytes:
        key_id = key_id_of(blob)
        if key_id is None:
            raise ValueCodecError(f"the stored value of {key!r} is not a sealed value "
                                  f"({len(blob)} bytes)")
        aead = self._aead(key_id)
        nonce = blob[_HEADER.size:_HEADER.size + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, blob[_HEADER.size + NONCE_BYTES:],
                                _VALUE_AAD + blob[:_HEADER.size] + key)
        except InvalidTag:
            raise ValueCodecError(f"the stored value of {key!r} fails to open with data key "
                                  f"{key_id}: it was altered, or sealed for another key") from None


class SealCounts:
    """How many values this node sealed with each data key (each seal draws a random nonce).

    Kept in a file (JSON, 0600) a block ahead of the count: the file is rewritten once per
    `block` seals, and a restart resumes from what it reserved, so it may count more than were
    made, never fewer. Without a path, counts live in memory only."""

    def __init__(self, path: str, master_id: int, block: int):
        self.path, self.master_id, self.block = path, master_id, block
        self.counts: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        if path:
            try:
                with open(path, "rb") as f:
                    body = json.loads(f.read(1 << 20))
                if body.get("master") == master_id:
                    self.reserved = {int(k): int(v) for k, v in body["sealed"].items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise KeyringError(f"{path}: unreadable seal counts ({exc}); a node must "
                                   "not forget how many values it sealed: restore the file, "
                                   "or remove it and run `raftcache keys rotate`") from None
            self.counts = dict(self.reserved)

    def count(self, key_id: int) -> int:
        return self.counts.get(key_id, 0)

    def add(self, key_id: int) -> None:
        n = self.counts.get(key_id, 0) + 1
        self.counts[key_id] = n
        if self.path and n > self.reserved.get(key_id, 0):
            self.reserved[key_id] = n - 1 + self.block
            self._save()

    def _save(self) -> None:
        write_private(self.path, json.dumps(
            {"master": self.master_id,
             "sealed": {str(k): v for k, v in sorted(self.reserved.items())}}))


# ================================================================================================
# Hooks
# ================================================================================================
# node -> its codec (several nodes may share a process in tests)
_CODECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled(config: Config) -> bool:
    """Whether `config` turns encryption at rest on: a keyring, and not ``enabled = false``."""
    return config.encryption.enabled is not False and bool(config.encryption.keyring)


def _plaintext_lookup(node) -> Callable[[bytes], bool] | None:
    return node.stores_plaintext if node.plaintext_routes else None


@hookimpl
def raftcache_value_codecs(node):
    if not enabled(node.config):
        return ()
    keyring = read_keyring(node.config.encryption.keyring, node.config)
    data_dir = node.config.node.data_dir
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    codec = EncryptionCodec(keyring, lambda: node.settings, _plaintext_lookup(node),
                            node.config.encryption.rotate_after,
                            os.path.join(data_dir, SEAL_COUNTS))
    _CODECS[node] = codec
    if node.plaintext_routes:
        node.log.warning("encryption at rest: values routed to %s are stored in plaintext "
                         "(encrypt_values = false), in the log and snapshots too",
                         ", ".join(node.plaintext_routes))
    return (codec,)


@hookimpl
def raftcache_node_started(node):
    codec = _CODECS.get(node)
    if codec is not None:
        node.log.info("encryption at rest: AES-256-GCM, master key %d (%s), data key %d active",
                      codec.keyring.master_id, codec.keyring.path, codec.active_id())
    elif node.config.encryption.enabled is False:
        node.log.warning("encryption at rest is off ([encryption] enabled = false): values "
                         "are stored in plaintext")


@hookimpl
def raftcache_check_command(command, settings):
    """Data keys are written once: a Configure that would replace or remove one is refused
    (two rotations racing for the same id must not leave values sealed under a key that was
    then replaced). Deterministic: it reads only the entry and the replicated settings."""
    if type(command) is Configure:
        for name, _value in command.items:
            if name.startswith(SETTING_PREFIX) and name in settings:
                return (f"data key {name[len(SETTING_PREFIX):]} exists; data keys are never "
                        "replaced or removed (retry the rotation)")
    return None


def _codec(node) -> EncryptionCodec:
    codec = _CODECS.get(node)
    if codec is None:
        raise ValueError("encryption at rest is off on this node (no [encryption] keyring)")
    return codec


def _position(args) -> int:
    if not args:
        return 0
    try:
        start = int(bytes(args[0]).decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"keys-reseal takes a position (an integer), got {args[0]!r}") from None
    if start < 0:
        raise ValueError("keys-reseal's position must not be negative")
    return start


@hookimpl
def raftcache_admin(node, action, args):
    if action == "keys-rotate":
        codec = _codec(node)
        if args:
            raise ValueError("keys-rotate takes no arguments")
        active = codec.active_id()
        command = codec.new_key()
        new_id = int(command.items[0][0][len(SETTING_PREFIX):])
        return command, {"key_id": new_id, "previous": active}
    if action == "keys-reseal":
        return _reseal(node, _codec(node), _position(args))
    if action == "keys-status":
        if args:
            raise ValueError("keys-status takes no arguments")
        return _status(node, _codec(node))
    if action == "keys-require-bound":
        if args:
            raise ValueError("keys-require-bound takes no arguments")
        return _require_bound(node, _codec(node))
    return None


def _require_bound(node, codec: EncryptionCodec):
    """Commit `BOUND_SETTING` once no value is stored unbound (counted like keys-status)."""
    if BOUND_SETTING in node.settings:
        return {"bound": True, "result": 0}
    values = _status(node, codec)["values"]
    if values is None:
        raise ValueError(f"more than {STATUS_LIMIT} keys: cannot check that none is stored "
                         "unbound")
    unbound = sum(n for name, n in values.items() if name.endswith("-unbound"))
    if unbound:
        raise ValueError(f"{unbound} values are still stored unbound; `raftcache keys "
                         "rotate` reseals them")
    return Configure(((BOUND_SETTING, b"1"),)), {"bound": True}


def _read(node, keys) -> list:
    """(stored blob, version) or None for each key, read between apply batches like a client
    read (a blob read while a batch is half applied could pair a new version with an old
    value, and a Reseal of that would bring the old value back)."""
    try:
        return node.read_settled(keys)
    except BackendUnavailable as exc:  # the backend is down or catching up
        raise RuntimeError(f"cannot read the stored values: {exc}") from None


def _layers(node, codec: EncryptionCodec):
    """The codecs outside this one (registered after it): a stored blob is theirs first."""
    codecs = tuple(node.codecs)
    return codecs[codecs.index(codec) + 1:]


def _reseal(node, codec: EncryptionCodec, start: int):
    """The next values after position `start` (write order) sealed under an older data key,
    sealed anew under the active one: a Reseal of them and where to go on."""
    from raftcache.core.cache.commands import Reseal

    active = codec.active_id()
    outer = _layers(node, codec)
    budget = node.config.node.max_request_bytes // 2  # one Reseal entry must fit the log
    items, size, scanned, unreadable = [], 0, 0, 0
    position = start
    total = node.key_count()
    while position < total and scanned < RESEAL_SCAN and not items:
        keys = node.keys_at(position, RESEAL_PAGE)
        if not keys:
            break
        for key, got in zip(keys, _read(node, keys), strict=True):
            if size >= budget:
                break
            position += 1
            scanned += 1
            if got is None or (codec._plaintext is not None and codec._plaintext(key)):
                continue
            blob, version = got
            try:
                inner = decode_value(outer, key, codec.unbind(key, version, blob))
                key_id = key_id_of(inner)
                if key_id is None or (key_id == active and inner[0] == MAGIC):
                    continue  # unbound (legacy) values are resealed under the active key too
                new = encode_value(outer, key, codec.seal(key, codec.open(key, inner), active))
            except ValueCodecError:
                unreadable += 1
                continue
            items.append((key, version, new))
            size += len(key) + len(new) + 16
        if size >= budget:
            break
    report = {"active": active, "next": position, "done": position >= total,
              "scanned": scanned, "keys": total, "unreadable": unreadable}
    if items:
        return Reseal(tuple(items)), report
    return {**report, "result": 0}


def _status(node, codec: EncryptionCodec) -> dict:
    settings = node.settings
    report = {"active": codec.active_id(), "known": data_key_ids(settings),
              "master": codec.keyring.master_id, "keys": node.key_count(),
              "sealed_here": codec.sealed.count(codec.active_id()),
              "bound": BOUND_SETTING in settings,
              "rotate_after": codec.rotate_after,
              "plaintext_routes": list(node.plaintext_routes)}
    if node.key_count() > STATUS_LIMIT:
        report["values"] = None  # too many to count on the leader's loop
        return report
    outer = _layers(node, codec)
    counts: dict[str, int] = {}
    for position in range(0, node.key_count(), 1000):
        keys = node.keys_at(position, 1000)
        for key, got in zip(keys, _read(node, keys), strict=True):
            if got is None:
                continue
            if codec._plaintext is not None and codec._plaintext(key):
                name = "plaintext"
            else:
                try:
                    inner = decode_value(outer, key, codec.unbind(key, got[1], got[0]))
                    key_id = key_id_of(inner)
                except ValueCodecError:
                    key_id = None
                if key_id is None:
                    name = "unreadable"
                else:  # unbound: sealed before the version binding, not yet resealed
                    name = str(key_id) if inner[0] == MAGIC else f"{key_id}-unbound"
            counts[name] = counts.get(name, 0) + 1
    report["values"] = counts
    return report
