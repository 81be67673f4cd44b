"""Partition ids of several sources: source 1 unchanged, the others prefixed."""

from __future__ import annotations

import pytest

from service.bus.sources import SOURCE_PREFIX, SOURCE_SEP, local_partition, qualify, source_of


def test_source_one_keeps_its_ids_so_old_checkpoints_stay_valid() -> None:
    assert qualify(1, "events:0") == "events:0"
    assert qualify(1, "http") == "http"
    assert source_of("events:0") == 1
    assert source_of("http") == 1
    assert local_partition("events:3") == "events:3"


@pytest.mark.parametrize("local", ["http", "events:0", "a.b-c_d:12", "demo"])
@pytest.mark.parametrize("position", [2, 3, 10, 123])
def test_other_sources_are_prefixed_and_round_trip(position: int, local: str) -> None:
    qualified = qualify(position, local)
    assert qualified == f"{SOURCE_PREFIX}{position}{SOURCE_SEP}{local}"
    assert source_of(qualified) == position
    assert local_partition(qualified) == local


def test_examples_of_the_contract() -> None:
    assert qualify(2, "http") == "s2/http"
    assert qualify(3, "events:0") == "s3/events:0"
    assert source_of("s2/http") == 2
    assert local_partition("s2/http") == "http"


def test_a_position_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="1-based"):
        qualify(0, "http")


def test_an_id_that_only_looks_prefixed_is_source_one() -> None:
    # no Kafka topic holds "/", but an id without digits after "s" is not a prefix
    assert source_of("sx/http") == 1
    assert source_of("s/http") == 1
    assert local_partition("sx/http") == "sx/http"
