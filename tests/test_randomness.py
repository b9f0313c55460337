"""Ids drawn from the pooled OS randomness (``dgserve.randomness``)."""

from __future__ import annotations

import os
import uuid

import pytest

from dgserve import randomness


def test_request_ids_are_version_4_uuids_and_distinct() -> None:
    ids = [randomness.request_id() for _ in range(3000)]  # spans several refills of the pool
    assert len(set(ids)) == len(ids)
    for text in ids[:50]:
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == text and len(text) == 32


@pytest.mark.parametrize("bits", [1, 7, 8, 80, 130])
def test_random_bits_stay_in_range_and_use_every_bit(bits: int) -> None:
    values = [randomness.random_bits(bits) for _ in range(400)]
    assert all(0 <= v < 2**bits for v in values)
    union = 0
    for v in values:
        union |= v
    assert union == 2**bits - 1  # every bit was set at least once: nothing is shifted out


def test_a_forked_child_does_not_reuse_the_parents_bytes() -> None:
    randomness.request_id()  # the pool now holds bytes the child would inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next id and leave at once
        os.write(write, randomness.request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    assert len(child) == 32 and child != randomness.request_id()
