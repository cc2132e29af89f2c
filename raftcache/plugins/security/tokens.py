"""Signed client tokens: Ed25519 keys, issuing, verifying.

A token is a JWT (RFC 7519) signed with EdDSA over Ed25519 (RFC 8037), and nothing else: the
algorithm is pinned (a header whose ``alg`` is not ``EdDSA`` is refused before anything else is
looked at, so ``alg: none`` and an HMAC "signed" with the public key get nowhere).

Header: ``{"alg": "EdDSA", "typ": "JWT", "kid": KEY_ID}`` where KEY_ID is the first 16 hex
digits of the SHA-256 of the raw 32-byte public key. Claims::

    sub     the subject (who): `check_subject`'s grammar
    grants  {key prefix: "r" | "w" | "rw" | "admin"}; "" is every key
    roles   [role name, ...]  (optional; their grants live in the cluster's settings)
    iat     issued at, nbf not before, exp expires (optional): JWT NumericDate, seconds since
            the epoch, with up to millisecond precision
    jti     a random id: what `token revoke --jti` names

Times are not judged here: a node judges them against its stamps (rbac.py). Every bound is
checked (token size, counts, lengths, types), and anything malformed is a `TokenError`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import os
import secrets
import stat
import time
from collections.abc import Iterable, Mapping

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from raftcache.core.cache.commands import PERMS, Caller
from raftcache.pluginapi import write_private

ALGORITHM = "EdDSA"
MAX_TOKEN_BYTES = 8 << 10
MAX_GRANTS = 64
MAX_ROLES = 32
MAX_SUBJECT_CHARS = 256
MAX_NAME_CHARS = 128  # a role name, a jti
MAX_PREFIX_BYTES = 1024
USER_TTL = 24 * 3600.0  # what `raftcache token issue` gives a token unless --ttl says
ADMIN_TTL = 7 * 24 * 3600.0  # the admin token of `raftcache up --auth`, reissued as it nears
_HEADER_KEYS = {"alg", "typ", "kid"}
_MAX_SECONDS = 10**13  # NumericDates beyond this (year 318857) are refused: ms stay < 2**63


class TokenError(ValueError):
    """A token that is malformed, signed by an unknown key, or forged."""


def check_subject(subject) -> str:
    """`subject` if it is one: 1 to MAX_SUBJECT_CHARS printable characters (spaces inside
    allowed; no tabs, newlines or other control characters), neither starting nor ending
    with a space. Raises TokenError. The one grammar of subjects: at issue, at verification
    and at revocation."""
    if (not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS
            or not subject.isprintable() or subject != subject.strip()):
        raise TokenError(f"a subject is 1 to {MAX_SUBJECT_CHARS} printable characters, not "
                         f"starting or ending with a space; got {subject!r}")
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenError("a subject must be valid UTF-8") from None
    return subject


# ================================================================================================
# Keys
# ================================================================================================
def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """The `kid` of tokens signed by the matching private key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: str) -> Ed25519PrivateKey:
    """The Ed25519 signing key in PEM file `path`; refused (TokenError) when the file is
    readable by group or others, or holds anything else."""
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TokenError(f"{path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{path}: a signing key must be readable by its owner only (chmod 600)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TokenError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TokenError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: str) -> Ed25519PublicKey:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TokenError(f"{path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise TokenError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TokenError(f"{path}: not an Ed25519 public key")
    return key


def load_public_keys(paths: Iterable[str]) -> dict[str, Ed25519PublicKey]:
    """key id -> public key, for ``[auth] public_keys``."""
    return {key_id(k): k for k in map(load_public_key, paths)}


def init_auth_dir(directory: str, now: float | None = None) -> dict[str, str]:
    """What `raftcache up --auth` needs in DATA_DIR/auth (made at the first start, kept after):
    ``signing.key`` (Ed25519, PKCS8 PEM, 0600), ``signing.pub`` and ``admin.token`` (0600;
    subject "admin", admin on every key, expiring after ADMIN_TTL: a start with less than a
    day of it left, or one it cannot read, writes a new one). The directory is 0700. Returns
    the three paths by name."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    paths = {name: os.path.join(directory, name)
             for name in ("signing.key", "signing.pub", "admin.token")}
    if not os.path.exists(paths["signing.key"]):
        write_private(paths["signing.key"], private_pem(generate_key()), replace=False)
    key = load_private_key(paths["signing.key"])
    pub = public_pem(key.public_key())
    if not os.path.exists(paths["signing.pub"]) or open(paths["signing.pub"], "rb").read() != pub:
        write_private(paths["signing.pub"], pub, mode=0o644)
    now = time.time() if now is None else now
    expiry = expires_at(paths["admin.token"])
    if expiry < now + 24 * 3600 or expiry == math.inf:  # (older ones never expired)
        write_private(paths["admin.token"],
                      issue(key, "admin", {"": "admin"}, ttl=ADMIN_TTL, now=now) + "\n")
    return paths


def expiry_text(exp: float) -> str:
    """A NumericDate as people read it (UTC); "never" for inf."""
    if exp == math.inf:
        return "never"
    return datetime.datetime.fromtimestamp(exp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def expires_at(path: str) -> float:
    """When the token in file `path` expires (seconds; inf: never), 0 when there is none or
    it is no token."""
    try:
        with open(path) as f:
            _header, claims = unverified(f.read().strip())
    except (OSError, TokenError):
        return 0.0
    exp = claims.get("exp")
    if exp is None:
        return math.inf
    return exp if type(exp) in (int, float) else 0.0


# ================================================================================================
# Issue
# ================================================================================================
def parse_grant(text: str) -> tuple[str, str]:
    """``PREFIX=PERMS`` (the prefix may be empty, and may hold "=") -> (prefix, perms)."""
    prefix, sep, perms = text.rpartition("=")
    if not sep or perms not in PERMS:
        raise ValueError(f"a grant is PREFIX=PERMS with PERMS one of {', '.join(PERMS)} "
                         f"(an empty PREFIX: every key), got {text!r}")
    if len(prefix.encode("utf-8")) > MAX_PREFIX_BYTES:
        raise ValueError(f"a grant's prefix is limited to {MAX_PREFIX_BYTES} bytes")
    return prefix, perms


def _numeric_date(t: float):
    """Seconds with millisecond precision; an int when whole."""
    ms = round(t * 1000)
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def issue(key: Ed25519PrivateKey, subject: str, grants: Mapping[str, str],
          roles: Iterable[str] = (), ttl: float | None = None, now: float | None = None,
          not_before: float | None = None) -> str:
    """A token for `subject` with `grants` (prefix -> perms) and `roles`, valid from
    `not_before` (default: now) for `ttl` seconds (None: no expiry)."""
    now = time.time() if now is None else now
    claims = {"sub": subject, "grants": dict(grants), "iat": _numeric_date(now),
              "nbf": _numeric_date(now if not_before is None else not_before),
              "jti": secrets.token_hex(16)}
    roles = list(roles)
    if roles:
        claims["roles"] = roles
    if ttl is not None:
        if not ttl > 0:
            raise ValueError("a token's ttl must be positive")
        claims["exp"] = _numeric_date(now + ttl)
    _check_claims(claims)  # never hand out a token the nodes would refuse
    return jwt.encode(claims, key, algorithm=ALGORITHM,
                      headers={"kid": key_id(key.public_key()), "typ": "JWT"})


# ================================================================================================
# Verify
# ================================================================================================
def unverified(token) -> tuple[dict, dict]:
    """(header, claims) of a token, without checking anything but its shape."""
    _check_shape(token)
    try:
        header = jwt.get_unverified_header(token)
        claims = json.loads(_b64(token.split(".")[1]))
    except (jwt.InvalidTokenError, ValueError, IndexError) as exc:
        raise TokenError(f"not a token: {exc}") from None
    if not isinstance(claims, dict):
        raise TokenError("not a token: its claims are not an object")
    return header, claims


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _check_shape(token) -> None:
    if not isinstance(token, str):
        raise TokenError("a token is a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(f"a token is limited to {MAX_TOKEN_BYTES} bytes")
    if not token.isascii() or token.count(".") != 2:
        raise TokenError("not a token (expected three base64url parts separated by dots)")


def verify(token, keys: Mapping[str, Ed25519PublicKey]) -> Caller:
    """The caller a token proves, signed by one of `keys` (key id -> public key). Raises
    TokenError; validity times are left to the caller (they are judged by stamps)."""
    _check_shape(token)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"not a token: {exc}") from None
    # Pinned: no algorithm negotiation, whatever the header says.
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"token algorithm {header.get('alg')!r} refused (only {ALGORITHM})")
    extra = set(header) - _HEADER_KEYS
    if extra:
        raise TokenError(f"token header has unexpected fields: {', '.join(sorted(extra))}")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError(f"token signed by an unknown key {kid!r}")
    try:
        claims = jwt.decode(token, keys[kid], algorithms=[ALGORITHM],
                            options={"verify_exp": False, "verify_nbf": False,
                                     "verify_iat": False, "verify_aud": False,
                                     "verify_iss": False})
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"token refused: {exc}") from None
    return _check_claims(claims, kid)


def _ms(claims: dict, name: str, default=None) -> int:
    value = claims.get(name, default)
    if value is None:
        raise TokenError(f"token lacks {name!r}")
    if type(value) not in (int, float) or not (math.isfinite(value) and
                                               0 <= value <= _MAX_SECONDS):
        raise TokenError(f"token claim {name!r} must be a NumericDate (seconds), got {value!r}")
    return round(value * 1000)


def _check_claims(claims, kid: str = "") -> Caller:
    if not isinstance(claims, dict):
        raise TokenError("token claims must be an object")
    sub = check_subject(claims.get("sub"))
    grants = claims.get("grants", {})
    if not isinstance(grants, dict) or len(grants) > MAX_GRANTS:
        raise TokenError(f"token grants must be an object of at most {MAX_GRANTS} prefixes")
    pairs = set()
    for prefix, perms in grants.items():
        if perms not in PERMS:
            raise TokenError(f"grant {prefix!r}: perms must be one of {', '.join(PERMS)}")
        try:
            raw = prefix.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenError("a grant's prefix is not valid UTF-8") from None
        if len(raw) > MAX_PREFIX_BYTES:
            raise TokenError(f"a grant's prefix is limited to {MAX_PREFIX_BYTES} bytes")
        pairs.add((raw, perms))
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or len(roles) > MAX_ROLES or not all(
            isinstance(r, str) and 0 < len(r) <= MAX_NAME_CHARS for r in roles):
        raise TokenError(f"token roles must be a list of at most {MAX_ROLES} names")
    jti = claims.get("jti", "")
    if not isinstance(jti, str) or len(jti) > MAX_NAME_CHARS:
        raise TokenError("token jti must be a short string")
    issued = _ms(claims, "iat")
    not_before = _ms(claims, "nbf", claims.get("iat"))
    expires = _ms(claims, "exp") if "exp" in claims else 0
    if "exp" in claims and expires == 0:
        raise TokenError("token expires at the epoch")
    try:
        for r in roles:
            r.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenError("token names must be valid UTF-8") from None
    return Caller(subject=sub, key_id=kid, issued_ms=issued, not_before_ms=not_before,
                  expires_ms=expires, grants=tuple(sorted(pairs)),
                  roles=tuple(sorted(set(roles))), jti=jti)
