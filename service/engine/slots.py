"""Which adapter lives in which LoRA slot: a small state machine with LRU eviction and pinning.

No torch here: the table only decides. The caller copies weights when ``acquire`` says a load is needed.

A slot is *free* (never filled or invalidated), *resident* (holds an adapter, unpinned: evictable) or *pinned*
(resident and used by at least one running request: never evicted). ``acquire`` pins; ``release`` unpins.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from service.engine.errors import NoFreeSlot


@dataclass(frozen=True)
class SlotLease:
    """The outcome of ``acquire``: the slot to use and whether the adapter's weights must be copied into it."""

    slot: int
    needs_load: bool
    evicted: str | None = None


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"at least one LoRA slot is needed, got {num_slots}")
        self.num_slots = num_slots
        self._owner: list[str | None] = [None] * num_slots
        self._pins: list[int] = [0] * num_slots
        self._lru: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, least recently used first

    def slot_of(self, adapter_id: str) -> int | None:
        """The slot holding ``adapter_id``, or None; does not count as a use."""
        return self._lru.get(adapter_id)

    def pins(self, slot: int) -> int:
        return self._pins[slot]

    def owner(self, slot: int) -> str | None:
        return self._owner[slot]

    @property
    def resident(self) -> dict[str, int]:
        """Adapter id -> slot, least recently used first."""
        return dict(self._lru)

    @property
    def pinned_slots(self) -> int:
        return sum(1 for p in self._pins if p > 0)

    def can_acquire(self, adapter_id: str) -> bool:
        """True when ``acquire`` would succeed: the adapter is resident, a slot is free or one is evictable."""
        return adapter_id in self._lru or self._victim() is not None

    def needs_load(self, adapter_id: str) -> bool:
        return adapter_id not in self._lru

    def acquire(self, adapter_id: str) -> SlotLease:
        """Pin the adapter's slot, choosing (and evicting) one when it is not resident. Raises ``NoFreeSlot``."""
        slot = self._lru.get(adapter_id)
        if slot is not None:
            self._pins[slot] += 1
            self._lru.move_to_end(adapter_id)
            return SlotLease(slot, needs_load=False)
        slot = self._victim()
        if slot is None:
            raise NoFreeSlot(f"all {self.num_slots} LoRA slots are pinned by running requests")
        evicted = self._owner[slot]
        if evicted is not None:
            del self._lru[evicted]
        self._owner[slot] = adapter_id
        self._lru[adapter_id] = slot
        self._pins[slot] = 1
        return SlotLease(slot, needs_load=True, evicted=evicted)

    def release(self, slot: int) -> None:
        """Unpin once; the adapter stays resident (now the most recently used)."""
        if self._pins[slot] <= 0:
            raise ValueError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        owner = self._owner[slot]
        if owner is not None:
            self._lru.move_to_end(owner)

    def invalidate(self, slot: int) -> None:
        """Forget the slot's content (its load failed, or its weights are no longer trusted). Pins are dropped too."""
        owner = self._owner[slot]
        if owner is not None:
            del self._lru[owner]
        self._owner[slot] = None
        self._pins[slot] = 0

    def _victim(self) -> int | None:
        """A free slot (lowest index) if any, else the least recently used unpinned one."""
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        for slot in self._lru.values():
            if self._pins[slot] == 0:
                return slot
        return None
