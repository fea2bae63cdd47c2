"""The slot table alone: fill, LRU eviction, pinning, refusal when every slot is pinned."""

from __future__ import annotations

import pytest

from service.engine import NoFreeSlot, SlotTable


def test_fills_free_slots_first_then_reuses_resident_ones() -> None:
    table = SlotTable(3)
    leases = [table.acquire(name) for name in ("a", "b", "c")]
    assert [lease.slot for lease in leases] == [0, 1, 2]
    assert all(lease.needs_load and lease.evicted is None for lease in leases)
    again = table.acquire("b")
    assert again.slot == 1 and not again.needs_load
    assert table.pins(1) == 2


def test_evicts_the_least_recently_used_unpinned_slot() -> None:
    table = SlotTable(2)
    for name in ("a", "b"):
        table.release(table.acquire(name).slot)
    table.release(table.acquire("a").slot)  # "a" is now more recent than "b"
    lease = table.acquire("c")
    assert lease.slot == 1 and lease.needs_load and lease.evicted == "b"
    assert table.slot_of("b") is None and table.slot_of("a") == 0 and table.slot_of("c") == 1
    assert list(table.resident) == ["a", "c"]


def test_pinned_slots_are_never_evicted() -> None:
    table = SlotTable(2)
    table.acquire("a")  # least recently used, but pinned by a running request
    table.release(table.acquire("b").slot)
    assert list(table.resident) == ["a", "b"]
    lease = table.acquire("c")
    assert lease.evicted == "b" and lease.slot == 1
    table.release(lease.slot)
    lease = table.acquire("d")
    assert lease.evicted == "c"
    assert table.slot_of("a") == 0 and table.pins(0) == 1


def test_refuses_when_all_slots_are_pinned_and_recovers_after_release() -> None:
    table = SlotTable(2)
    a, b = table.acquire("a"), table.acquire("b")
    assert table.pinned_slots == 2
    assert not table.can_acquire("c") and table.can_acquire("a")
    with pytest.raises(NoFreeSlot, match="pinned"):
        table.acquire("c")
    assert table.slot_of("c") is None and table.pins(a.slot) == 1  # a refused acquire changes nothing
    table.acquire("a")  # a resident adapter can still be shared
    table.release(b.slot)
    lease = table.acquire("c")
    assert lease.slot == b.slot and lease.evicted == "b"


def test_release_of_an_unpinned_slot_and_invalidate() -> None:
    table = SlotTable(1)
    lease = table.acquire("a")
    table.release(lease.slot)
    with pytest.raises(ValueError, match="not pinned"):
        table.release(lease.slot)
    table.invalidate(lease.slot)
    assert table.slot_of("a") is None and table.owner(0) is None
    assert table.acquire("a").needs_load


def test_rejects_an_empty_table() -> None:
    with pytest.raises(ValueError):
        SlotTable(0)
