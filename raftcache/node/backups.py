"""Backup images of a replica's whole state, taken by its Ready loop between apply batches."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import attrs
import gevent.event

from raftcache.core import api
from raftcache.core.raft import RawNode
from raftcache.pluginapi import BackendLost, BackendUnavailable

from .applier import Applier


@attrs.define
class Backups:
    """Contract: `take` asks the Ready loop for an image of everything applied so far and
    waits for it (raising gevent.Timeout, BackendUnavailable or BackendLost); the loop takes
    every image asked for at once, between apply batches (`take_wanted`). The newest image
    is kept whole (`newest`), so that a client can read it a part at a time."""

    applier: Applier
    raw: RawNode
    wake: Callable[[], None]  # the Ready loop's
    wanted: list[gevent.event.AsyncResult] = attrs.Factory(list)
    newest: api.SnapshotPart | None = None  # with the whole image in `data`

    def take(self, timeout: float) -> api.SnapshotPart:
        wanted = gevent.event.AsyncResult()
        self.wanted.append(wanted)
        self.wake()
        self.newest = wanted.get(timeout=timeout)
        return self.newest

    def take_wanted(self) -> None:
        """In the Ready loop, between apply batches: the image the waiting backups asked for."""
        wanted, self.wanted = self.wanted, []
        try:
            image = self.applier.snapshot()
        except (BackendUnavailable, BackendLost) as exc:
            for w in wanted:
                w.set_exception(exc)
            return
        st = self.raw.status()
        part = api.SnapshotPart(index=st.applied, term=self.raw.term_at(st.applied) or st.term,
                                size=len(image), sha256=hashlib.sha256(image).hexdigest(),
                                data=image)
        for w in wanted:
            w.set(part)
