"""The service's budget accountant: never over capacity, first come first served, units given
back by clients that leave; the decode cost table and the limits' own checks."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipkit.embed.limits import Accountant, ClientGone, ServeLimits, body_cost, decode_cost


@settings(max_examples=60, deadline=None, database=None)
@given(
    capacity=st.integers(1, 50),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=30),
    holds=st.lists(st.integers(0, 3), min_size=1, max_size=30),
)
def test_concurrent_holders_never_exceed_capacity(capacity, sizes, holds) -> None:
    sizes = [min(s, capacity) for s in sizes]
    lane = Accountant(capacity, "test", poll_s=0.001)
    granted: list[int] = []

    async def one(i: int, n: int) -> None:
        async with lane.hold(n):
            assert lane.used <= capacity
            granted.append(i)
            for _ in range(holds[i % len(holds)]):
                await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(one(i, n) for i, n in enumerate(sizes)))

    asyncio.run(main())
    assert sorted(granted) == list(range(len(sizes)))  # everyone served: no deadlock
    assert lane.used == 0 and lane.waiting == 0 and lane.peak <= capacity


def test_first_come_first_served() -> None:
    lane = Accountant(10, "test", poll_s=0.001)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        async with lane.hold(n):
            order.append(name)
            await asyncio.sleep(0)

    async def main() -> None:
        assert lane.try_acquire(6)
        big = asyncio.create_task(take("big", 10))  # must wait for all 10
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 1))  # fits now, but came later
        await asyncio.sleep(0.01)
        assert order == [] and lane.waiting == 2
        lane.release(6)
        await asyncio.gather(big, small)

    asyncio.run(main())
    assert order == ["big", "small"]


def test_a_client_that_leaves_gives_its_place_back() -> None:
    lane = Accountant(4, "test", poll_s=0.001)

    async def main() -> None:
        assert lane.try_acquire(4)

        async def gone() -> bool:
            return True

        with pytest.raises(ClientGone):
            await lane.acquire(2, gone)
        assert lane.waiting == 0
        lane.release(4)
        await lane.acquire(4)  # the whole capacity is free again

    asyncio.run(main())
    with pytest.raises(ValueError, match="exceeds the capacity"):
        asyncio.run(lane.acquire(5))


def test_decode_costs_and_limit_checks() -> None:
    assert decode_cost("RGB", 100, 10) == 9_000
    assert decode_cost("I;16", 100, 10) == 32_000 and decode_cost("I;16B", 1, 1) == 32
    assert decode_cost("I", 10, 10) == 4_000 and decode_cost("F", 10, 10) == 1_200
    assert body_cost(1000, 10**6) == 4000 + 64 * 501
    lim = ServeLimits()
    assert lim.body_lane_bytes + lim.decode_lane_bytes == lim.memory_budget_bytes
    assert lim.host_allowed("LocalHost:8000") and lim.host_allowed("[::1]:1")
    assert not lim.host_allowed("evil.example") and not lim.host_allowed("")
    with pytest.raises(ValueError, match="for request bodies"):
        ServeLimits(memory_budget_bytes=8 * 2**20)
    with pytest.raises(ValueError, match="for decoding"):
        ServeLimits(max_pixels=10**9)
    with pytest.raises(ValueError, match="max_k must be a positive integer"):
        ServeLimits(max_k=0)
    with pytest.raises(ValueError, match="allowed_hosts is empty"):
        ServeLimits(allowed_hosts=())
