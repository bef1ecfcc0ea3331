"""Operations written once for the sync and the async client: plans and their two drivers.

# NOTE [plans]
An operation of the client (``jvp``, ``Job.wait``, ``Linearization.close``, ...) is
a *plan*: a generator that yields steps, a :class:`Call` (one HTTP request; the
driver sends it, with the retries of NOTE [retries], and sends the response back
into the plan, or throws the client error into it), a :class:`Sleep`, or, for the
plans of iterators, an :class:`Emit` of one item. It returns the operation's
result. A plan does no I/O, so the same code serves :class:`JVPClient` (driven by
:func:`run` and :func:`iterate`) and :class:`AsyncJVPClient` (by :func:`arun` and
:func:`aiterate`); the methods are bound with :func:`sync_method` and
:func:`async_method`, which keep the plan's signature and docstring (for ``help``,
IDEs and mypy). The objects that drive plans (the clients; ``Job`` and
``Linearization`` through the client they hold) are typed by the Protocols
:class:`SyncRunner` and :class:`AsyncRunner`, so no module imports the clients.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

import httpx

from ._base import NOT_GIVEN, Limits, OutputKind, TimeoutTypes
from ._exceptions import JVPError

__all__ = [
    "AsyncClosesOnExit",
    "AsyncRunner",
    "Call",
    "ClosesOnExit",
    "Emit",
    "Handle",
    "Plan",
    "Sleep",
    "SyncRunner",
    "aiterate",
    "arun",
    "async_iterator",
    "async_method",
    "awaited",
    "complete",
    "gather",
    "iterate",
    "run",
    "sync_iterator",
    "sync_method",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True)
class Call:
    """One HTTP request of a plan: the body is ``json_body`` (sent as JSON) or ``content``
    (bytes, whose ``Content-Type`` is in ``headers``)."""

    method: str
    path: str
    json_body: Any = None
    content: bytes | None = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    timeout: TimeoutTypes = NOT_GIVEN
    max_retries: int | None = None
    ok_statuses: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Sleep:
    """Wait (between job polls)."""

    seconds: float


@dataclass(frozen=True)
class Emit(Generic[T]):
    """One item of an iterator plan (a page, a job)."""

    item: T


Step = Call | Sleep | Emit[Any]
#: A plan: yields steps, receives responses, returns ``R``. See NOTE [plans].
Plan = Generator[Step, Any, R]


class SyncRunner(Limits, Protocol):
    """What drives plans synchronously: :class:`JVPClient`."""

    def _send(self, call: Call) -> httpx.Response: ...

    def _sleep(self, seconds: float) -> None: ...


class AsyncRunner(Limits, Protocol):
    """What drives plans on an event loop: :class:`AsyncJVPClient`."""

    async def _send(self, call: Call) -> httpx.Response: ...

    async def _sleep(self, seconds: float) -> None: ...


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


Info = TypeVar("Info", bound=_Identified)


class Handle(Generic[C, Info]):
    """A resource made by a client (``Job``, ``Linearization``): its plans run with that
    client (``_runner``), ``info`` is its state last seen, and its tensors come back as
    ``kind`` says."""

    def __init__(self, client: C, info: Info, kind: OutputKind | None) -> None:
        self._client = self._runner = client
        self.info = info
        self._kind = kind or OutputKind()

    @property
    def id(self) -> str:
        """The id the service gave it."""
        return self.info.id


_W = TypeVar("_W", bound="ClosesOnExit")
_AW = TypeVar("_AW", bound="AsyncClosesOnExit")


class ClosesOnExit:
    """``with x:`` calls ``x.close()`` on exit (the clients, ``Linearization``, the SciPy
    operators)."""

    close: Callable[[], Any]

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClosesOnExit:
    """``async with x:`` awaits ``x.close()`` on exit."""

    close: Callable[[], Coroutine[Any, Any, Any]]

    async def __aenter__(self: _AW) -> _AW:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _advance(plan: Plan[Any], value: Any, error: BaseException | None) -> Step:
    return plan.throw(error) if error is not None else plan.send(value)


async def _step(runner: SyncRunner | AsyncRunner, step: Step) -> tuple[Any, BaseException | None]:
    """Do one step with ``runner``: its methods' results are awaited where they are
    awaitable (an AsyncRunner's), taken as they are otherwise (a SyncRunner's)."""
    if isinstance(step, Sleep):
        await awaited(runner._sleep(step.seconds))
        return None, None
    if not isinstance(step, Call):
        raise TypeError(f"a plan yielded {step!r} where a request was expected")
    try:
        return await awaited(runner._send(step)), None
    except JVPError as exc:
        return None, exc


async def awaited(result: Any) -> Any:
    """``result``, awaited when it is awaitable (NOTE [one driver])."""
    return await result if inspect.isawaitable(result) else result


# NOTE [one driver]: the driver is written once, as an async generator (aiterate); with a
# SyncRunner nothing in it ever waits on the event loop (the runner's methods block and
# return plain values), so the sync drivers run the same coroutines to completion with
# one ``send(None)`` each (`complete`), without an event loop.


async def aiterate(
    runner: SyncRunner | AsyncRunner, plan: Plan[Any], result: list[Any] | None = None
) -> AsyncGenerator[Any, None]:
    """The items ``plan`` emits, for ``async for``; its return value is appended to
    ``result`` when one is given."""
    value, error = None, None
    while True:
        try:
            step = _advance(plan, value, error)
        except StopIteration as stop:
            if result is not None:
                result.append(stop.value)
            return
        if isinstance(step, Emit):
            value, error = None, None
            yield step.item
        else:
            value, error = await _step(runner, step)


async def arun(runner: SyncRunner | AsyncRunner, plan: Plan[R]) -> R:
    """Drive ``plan`` to its result (on the event loop, for an AsyncRunner)."""
    result: list[R] = []
    async for item in aiterate(runner, plan, result):
        raise TypeError(f"a plan yielded {Emit(item)!r} where a request was expected")
    return result[0]


def complete(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (NOTE [one driver])."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        done: T = stop.value
        return done
    coroutine.close()
    raise RuntimeError("a plan driven by a sync client waited on an event loop")


def run(runner: SyncRunner, plan: Plan[R]) -> R:
    """Drive ``plan`` to its result."""
    return complete(arun(runner, plan))


def iterate(runner: SyncRunner, plan: Plan[None]) -> Iterator[Any]:
    """The items ``plan`` emits, fetched as they are asked for."""
    items = aiterate(runner, plan)
    try:
        while True:
            try:
                yield complete(items.__anext__())
            except StopAsyncIteration:
                return
    finally:
        complete(items.aclose())  # a loop left early: the plan is closed at once


def _as_method(method: Callable[..., Any], build: Callable[..., Any], result: Any = None) -> None:
    """Give ``method`` the plan's name, docstring and signature, with ``self`` first and
    ``result`` (default: the plan's result) as the return annotation (what ``help()`` and
    IDEs show)."""
    functools.update_wrapper(method, build)
    signature = inspect.signature(build)
    first, *rest = signature.parameters.values()
    if result is None:
        result = signature.return_annotation
    if isinstance(result, str) and result.startswith("Plan[") and result.endswith("]"):
        result = result[len("Plan[") : -1]
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[first.replace(name="self", annotation=inspect.Parameter.empty), *rest],
        return_annotation=result,
    )


def gather(plan: Plan[None]) -> Plan[list[Any]]:
    """Run the iterator plan ``plan`` inside another plan: its steps pass through, the
    items it emits come back as a list (``items = yield from gather(plan)``)."""
    items: list[Any] = []
    value = None
    while True:
        try:
            step = plan.send(value)
        except StopIteration:
            return items
        if isinstance(step, Emit):
            items.append(step.item)
            value = None
        else:
            value = yield step


def sync_method(
    build: Callable[Concatenate[Any, P], Plan[R]],
) -> Callable[Concatenate[Any, P], R]:
    """A method that runs the plan ``build(self, ...)`` with ``self._runner``."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return run(self._runner, build(self, *args, **kwargs))

    _as_method(method, build)
    return method


def async_method(
    build: Callable[Concatenate[Any, P], Plan[R]],
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]:
    """The coroutine method that runs the plan ``build(self, ...)`` with ``self._runner``."""

    async def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await arun(self._runner, build(self, *args, **kwargs))

    _as_method(method, build)
    return method


def sync_iterator(
    build: Callable[Concatenate[Any, P], Plan[None]], item: type[T]
) -> Callable[Concatenate[Any, P], Iterator[T]]:
    """A method that iterates over the ``item``s the plan ``build(self, ...)`` emits,
    fetched with ``self._runner`` as the loop asks for them."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        return iterate(self._runner, build(self, *args, **kwargs))

    _as_method(method, build, f"Iterator[{item.__name__}]")
    return method


def async_iterator(
    build: Callable[Concatenate[Any, P], Plan[None]], item: type[T]
) -> Callable[Concatenate[Any, P], AsyncIterator[T]]:
    """The ``async for`` twin of :func:`sync_iterator`."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        return aiterate(self._runner, build(self, *args, **kwargs))

    _as_method(method, build, f"AsyncIterator[{item.__name__}]")
    return method
