"""Linearize once, apply many: the sessions that `POST /linearize` opens.

A session keeps the function that `torch.func.linearize` returned (an fx graph
holding the intermediates of the forward pass at the primals) for a fixed time
to live from its creation. Only the device worker that created a session ever
calls it (see NOTE [one dual level per process] in `app.engine.worker`): the
service queues every application on ``session.device``'s worker.

Memory: each session's size is estimated when it is made (NOTE [linearize
session size] in `app.engine.operations`); one past ``max_session_bytes`` is
refused (413), and the sizes of all live sessions count against
``budget_bytes`` (503 with Retry-After: the time until enough sessions expire).
Expired sessions are dropped when looked up and by `sweep` (which the app runs
periodically).

    >>> store = LinearizeStore(ttl_s=60, max_session_bytes=100, budget_bytes=150)
    >>> s = store.add(LinearizeSession(target=None, dtype=None, device=None,
    ...     argument_names=("x",), input_indices=(0,), shapes=((3,),), apply=print, nbytes=100))
    >>> store.get(s.id) is s, store.used_bytes
    (True, 100)
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.errors import NotFound, Overloaded, TooLarge


class StorageBytes:
    """Bytes of tensors counted once per storage (a view, or a weight two tensors share,
    adds nothing): what a session holds (NOTE [linearize session size] in
    app/engine/operations.py)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()
        self.nbytes = 0

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += storage.nbytes()


@dataclass(eq=False)
class LinearizeSession:
    target: Any  # the Target it was made from (app.engine.target.Target)
    dtype: Any  # torch.dtype
    device: Any  # torch.device
    argument_names: tuple[str, ...]  # inputs then parameters, in the order `apply` takes them
    input_indices: tuple[int, ...]  # of the inputs among argument_names, in the target's inputs
    shapes: tuple[tuple[int, ...], ...]  # of each argument
    apply: Callable[..., Any]  # the linearized function: tangents -> J·t per output
    nbytes: int
    # (tangents, batched) -> J·t with the arguments whose tangent is None held fixed,
    # exactly (NOTE [linearize without a tangent] in app/engine/operations.py).
    apply_without: Callable[..., Any] | None = None
    # With options.transpose: what Jᵀu needs (app.engine.vjp.Transpose), else None.
    transpose: Any = None
    id: str = ""  # set by `LinearizeStore.add`, with expires_at (wall-clock seconds)
    expires_at: float = 0.0


class LinearizeStore:
    """Live linearize sessions by id, bounded in size and time. Thread-safe.

    ``clock`` gives the wall-clock time in seconds (``time.time``); tests swap it.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        max_session_bytes: int,
        budget_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_session_bytes > budget_bytes:
            raise ValueError(
                f"max_session_bytes ({max_session_bytes}) must not exceed budget_bytes "
                f"({budget_bytes})"
            )
        self.ttl_s = ttl_s
        self.max_session_bytes = max_session_bytes
        self.budget_bytes = budget_bytes
        self.clock = clock
        self._sessions: dict[str, LinearizeSession] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._sessions.values())

    def add(self, session: LinearizeSession) -> LinearizeSession:
        """Keep a new session, its id and expiry set here, or refuse it: 413 past the
        per-session limit, 503 past the budget."""
        nbytes = session.nbytes
        if nbytes > self.max_session_bytes:
            raise TooLarge(
                f"This linearization holds about {nbytes} bytes; the limit per session is "
                f"{self.max_session_bytes} (JVP_LINEARIZE_MAX_SESSION_BYTES). Linearize "
                "with respect to fewer inputs ('wrt') or at a smaller point",
                param="primals",
            )
        now = self.clock()
        with self._lock:
            self._drop_expired(now)
            used = sum(s.nbytes for s in self._sessions.values())
            if used + nbytes > self.budget_bytes:
                raise Overloaded(
                    f"Linearize sessions hold {used} of {self.budget_bytes} bytes "
                    f"(JVP_LINEARIZE_BUDGET_BYTES) and this one needs {nbytes}; retry once "
                    "sessions expire, or DELETE /linearize/{id} the ones you are done with",
                    retry_after_s=self._seconds_until_room(now, used, nbytes),
                )
            session.id = secrets.token_hex(16)
            session.expires_at = now + self.ttl_s
            self._sessions[session.id] = session
            return session

    def _seconds_until_room(self, now: float, used: int, nbytes: int) -> int:
        freed = 0
        for s in sorted(self._sessions.values(), key=lambda s: s.expires_at):
            freed += s.nbytes
            if used - freed + nbytes <= self.budget_bytes:
                return max(1, math.ceil(s.expires_at - now))
        return max(1, math.ceil(self.ttl_s))

    def get(self, session_id: str) -> LinearizeSession:
        now = self.clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= now:
                del self._sessions[session_id]
                session = None
        if session is None:
            raise NotFound(
                f"Unknown or expired linearize session {session_id!r}; sessions live "
                f"{self.ttl_s:g} s (JVP_LINEARIZE_TTL_S): POST /linearize again",
                param="id",
            )
        return session

    def delete(self, session_id: str) -> None:
        self.get(session_id)  # 404 when unknown or expired
        with self._lock:
            self._sessions.pop(session_id, None)

    def sweep(self) -> int:
        """Drop every expired session; how many were dropped."""
        with self._lock:
            return self._drop_expired(self.clock())

    def _drop_expired(self, now: float) -> int:
        expired = [k for k, s in self._sessions.items() if s.expires_at <= now]
        for k in expired:
            del self._sessions[k]
        return len(expired)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
