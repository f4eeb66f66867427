"""Request ids: `RequestIds` (the proxy's) keep `new_request_id`'s format and uniqueness."""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid

import pytest

from meterproxy.usage import RequestIds, new_request_id

UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _ms(request_id: str) -> int:
    return uuid.UUID(request_id).int >> 80


@pytest.mark.parametrize("make", [new_request_id, RequestIds()], ids=["new_request_id", "RequestIds"])
def test_ids_are_uuid7_text_stamped_with_the_millisecond(make) -> None:
    before = time.time_ns() // 1_000_000
    ids = [make() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    for rid in ids:
        assert UUID_TEXT.match(rid), rid
        parsed = uuid.UUID(rid)
        assert str(parsed) == rid
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= _ms(rid) <= after
    assert len(set(ids)) == len(ids)
    assert [_ms(r) for r in ids] == sorted(_ms(r) for r in ids)  # time-ordered by millisecond


def test_one_owner_counts_and_wraps_without_repeating_within_a_millisecond() -> None:
    ids = RequestIds()
    many = [ids() for _ in range(50_000)]
    assert len(set(many)) == len(many)
    # The counter is the last 24 bits; consecutive ids of one owner step it by one (mod 2^24).
    tails = [int(r[-6:], 16) for r in many]
    assert all((b - a) % (1 << 24) == 1 for a, b in itertools.pairwise(tails))


def test_owners_draw_their_own_random_bits() -> None:
    owners = [RequestIds() for _ in range(200)]
    middles = {o()[14:30] for o in owners}  # rand_a, variant and rand_b up to the counter
    assert len(middles) == len(owners)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_new_bits() -> None:
    ids = RequestIds()
    parent = ids()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, ids().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert UUID_TEXT.match(child)
    assert child[14:30] != parent[14:30]
