"""ecoworker.client's task ids: standard UUIDs that sort in the order they were made."""

from __future__ import annotations

import itertools
import time
import uuid

from ecoworker.client import build_message, new_task_id


def test_ids_are_version_7_uuids() -> None:
    """Each id parses as a UUID of version 7 with the RFC 4122 variant, in canonical text form."""
    for _ in range(1000):
        text = new_task_id()
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)


def test_ids_carry_the_time_they_were_made_and_sort_by_it() -> None:
    """The first 48 bits are Unix milliseconds: ids made in later milliseconds sort after earlier
    ones as text (what keeps the journal's index writes at its end)."""
    before = time.time_ns() // 1_000_000
    batches = []
    for _ in range(5):
        batches.append([new_task_id() for _ in range(50)])
        time.sleep(0.003)
    after = time.time_ns() // 1_000_000
    stamps = [uuid.UUID(t).int >> 80 for batch in batches for t in batch]
    assert all(before <= s <= after for s in stamps)
    for earlier, later in itertools.pairwise(batches):
        assert max(earlier) < min(later)


def test_ids_do_not_repeat() -> None:
    """100,000 ids made as fast as possible (many in the same millisecond) are all different."""
    assert len({new_task_id() for _ in range(100_000)}) == 100_000


def test_messages_get_a_new_id_unless_one_is_given() -> None:
    """build_message makes a time-ordered id, and keeps one the caller chose (idempotent publishing)."""
    assert uuid.UUID(build_message("t").id).version == 7
    assert build_message("t", task_id="order-42").id == "order-42"
