"""Proving a peer holds the cluster secret: the challenge-response both ends of a new peer
connection run when peers are not identified by TLS node certificates.

Contract: `peer_proof` is an HMAC-SHA256 over a fixed layout that every node computes alike
(changing it is a protocol change between nodes); each end contributes a fresh `new_nonce()`,
so a recorded exchange cannot be replayed, and the role keeps one side's proof from serving as
the other's. Callers compare proofs with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

NONCE_BYTES = 32
_PROOF = struct.Struct(">16sqqq32s32s")


def peer_proof(secret: bytes, role: bytes, cluster_id: int, frm: int, to: int,
               dialer_nonce: bytes, listener_nonce: bytes) -> bytes:
    """HMAC-SHA256 by which one end of a new peer connection proves it holds the cluster
    secret. Both ends contribute a fresh nonce, so a recorded handshake cannot be replayed;
    `role` (b"dialer" or b"listener") keeps one side's proof from serving as the other's."""
    msg = _PROOF.pack(b"raftcache-peer-1", cluster_id, frm, to, dialer_nonce,
                      listener_nonce) + role
    return hmac.new(secret, msg, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)
