"""Fixtures for tests that need separate hosts: network namespaces made by
:mod:`tests.support.topology` (root only; skipped, with the reason, elsewhere)."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from tests.support.topology import Topology, cleanup_stale, missing_requirements


def _require() -> None:
    problem = missing_requirements()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    """validator, miner1, miner2 and user, each its own host on one bridge; checked clean after."""
    _require()
    cleanup_stale()
    topo = Topology()
    with topo:
        yield topo
    assert topo.leftovers() == []


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    """Builds more topologies inside a test (``make_topology(("a", "b"))``); all are torn down and
    checked clean when the test ends, whatever happened in it."""
    _require()
    made: list[Topology] = []

    def make(hosts=("validator", "miner1", "miner2", "user"), **kw) -> Topology:
        topo = Topology(hosts, **kw)
        made.append(topo)
        return topo.__enter__()

    yield make
    for topo in made:
        topo.teardown()
    assert [item for topo in made for item in topo.leftovers()] == []
