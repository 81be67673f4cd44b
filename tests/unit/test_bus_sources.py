"""service.bus.sources: source 1 keeps its partition names; others are prefixed."""

from __future__ import annotations

import pytest

from service.bus.sources import local_partition, qualify, source_of


@pytest.mark.parametrize(
    ("position", "local", "qualified"),
    [
        (1, "events:0", "events:0"),
        (1, "http", "http"),
        (2, "http", "s2/http"),
        (3, "t:1", "s3/t:1"),
    ],
)
def test_qualify_and_back(position: int, local: str, qualified: str) -> None:
    assert qualify(position, local) == qualified
    assert source_of(qualified) == position
    assert local_partition(qualified) == local


@pytest.mark.parametrize("partition", ["s1/x", "s/x", "sx/y", "s²/x", "events:0", "s0/x"])
def test_names_that_only_look_prefixed_are_source_one(partition: str) -> None:
    assert source_of(partition) == 1
    assert local_partition(partition) == partition
