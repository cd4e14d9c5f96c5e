"""The real and the fake claude-relay-service, once per session (see tests/upstreams/crsrun.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.upstreams.crsrun import Relay, start_fake_crs, start_real_crs


@pytest.fixture(scope="session")
def real_crs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    yield from start_real_crs(tmp_path_factory)


@pytest.fixture(scope="session")
def fake_crs() -> Iterator[Relay]:
    yield from start_fake_crs()
