"""The worker's cost models that are learned, not computed: whether batching a key pays
(`BatchPayoff`, NOTE [batching must pay]), and the one bounded table they keep per key
(`Bounded`). The inline decision (NOTE [tiny work runs inline]) is the worker's own
(`DeviceWorker.may_inline`): it shares the worker's step lock and timings.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Bounded(dict[K, V]):
    """A dict of at most ``max_keys`` keys: a new key past that clears it first. Tables keyed
    by work (batch keys, work keys) would otherwise grow with every distinct shape a client
    sends; forgetting all at once costs a few re-measurements, never a wrong answer."""

    def __init__(self, max_keys: int = 1024) -> None:
        super().__init__()
        self.max_keys = max_keys

    def __setitem__(self, key: K, value: V) -> None:
        if key not in self and len(self) >= self.max_keys:
            self.clear()
        super().__setitem__(key, value)


class BatchPayoff:
    """Whether stacking pays for a batch key, learned from the worker's own timings.

    # NOTE [batching must pay]
    vmap over ``torch.func.jvp`` has a fixed cost (it dispatches through PyTorch's
    Python reference kernels), so for tiny work, such as an expression on a 10x10
    tensor, a batch of eight takes longer than eight dual-tensor JVPs one after
    another, while for a model it is several times faster. So the worker keeps, per
    batch key, a moving average of the compute time per item alone (from items that
    ran alone anyway: a request reaching an idle worker) and per item in a batch,
    and stacks only while batching is the cheaper of the two, or not yet compared.
    Every ``probe_every`` chances a key runs the other way once, so both averages
    stay current and a change of load is noticed. The first run of each way is not
    counted: it pays one-time costs.

    Waiting for company is judged apart from stacking: while the worker waits
    (``JVP_BATCH_WAIT_US``) it computes nothing, so a batch that waited costs its
    wait too. Per key, a third average holds the time per item of batches that
    waited, wait included, and the worker waits only while that beats the time
    alone (probed like the other). Before, only the compute time was counted: a
    batch of two that waited 2 ms to compute in 0.3 ms read as 0.15 ms per item,
    cheaper than 0.22 ms alone, while it served one item per 1.15 ms. On a busy
    machine (issue 22) the company that the wait was for arrives late, and such
    batches cost throughput: now the worker stops waiting and still stacks what is
    already queued, which costs no wait.
    """

    def __init__(self, *, alpha: float = 0.2, probe_every: int = 64, max_keys: int = 1024):
        self.alpha = alpha
        self.probe_every = probe_every
        self.max_keys = max_keys
        self._alone: dict[Hashable, float] = {}  # ms per item, computed alone
        self._batched: dict[Hashable, float] = {}  # ms per item, computed in a batch
        self._waited: dict[Hashable, float] = {}  # ms per item of a batch that waited, wait too
        self._chances: Bounded[Hashable, int] = Bounded(max_keys)
        self._wait_chances: Bounded[Hashable, int] = Bounded(max_keys)
        self._seen: set[tuple[Hashable, bool]] = set()

    def record(self, key: Hashable, items: int, ms: float, waited_ms: float | None = None) -> None:
        """A step of ``items`` that computed in ``ms``; ``waited_ms``: how long it waited for
        company first (None: it did not wait)."""
        table = self._alone if items == 1 else self._batched
        if len(table) >= self.max_keys and key not in table:
            table.clear()
            self._waited.clear()
            self._seen.clear()
        if (key, items == 1) not in self._seen:
            # The first run of a key pays one-time costs (casting weights, binding
            # constants, vmap's first trace): it says nothing about the next ones.
            self._seen.add((key, items == 1))
            return
        self._average(table, key, ms / items)
        if items > 1 and waited_ms is not None:
            self._average(self._waited, key, (ms + waited_ms) / items)

    def record_lonely_wait(self, key: Hashable, waited_ms: float) -> None:
        """A wait for company that found none: the item then ran alone, ``waited_ms`` late."""
        alone = self._alone.get(key)
        if alone is not None:
            self._average(self._waited, key, alone + waited_ms)

    def _average(self, table: dict[Hashable, float], key: Hashable, per_item: float) -> None:
        old = table.get(key)
        table[key] = per_item if old is None else old + self.alpha * (per_item - old)

    def worth_batching(self, key: Hashable) -> bool:
        """Whether to stack the items of ``key`` that wait now."""
        return self._decide(self._chances, key, self._batched.get(key))

    def worth_waiting(self, key: Hashable) -> bool:
        """Whether a busy worker should wait for more items of ``key`` to stack."""
        return self._decide(self._wait_chances, key, self._waited.get(key))

    def _decide(self, chances: Bounded[Hashable, int], key: Hashable, way: float | None) -> bool:
        alone = self._alone.get(key)
        # Batch (or wait) until both are measured, then whichever is cheaper per item.
        prefer = alone is None or way is None or way < alone
        seen = chances.get(key, 0) + 1
        if seen >= self.probe_every:
            chances.pop(key, None)
            return not prefer  # now and then the other way, to notice a change
        chances[key] = seen
        return prefer
