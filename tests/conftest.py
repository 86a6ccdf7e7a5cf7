"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import LoopbackHub, configure_clients, set_offline

# ======================================================================================================================
# Hub: every test is offline unless it asks for the `hub` fixture, which serves a loopback Hub (tests/hub_server.py).
# ======================================================================================================================

HUB_TOKEN = "hf_loopback_test_token"


@dataclass(frozen=True)
class HubFixture:
    """What a test gets from `hub`.

    Attributes:
        endpoint: The loopback Hub's URL, which `HF_ENDPOINT` and the clients' constants point to.
        token: The token the clients send.
        home: The test's `HF_HOME`, holding the Hub and `datasets` caches.
        server: The running server, whose `store` holds the repos and the request log.
    """

    endpoint: str
    token: str
    home: Path
    server: LoopbackHub


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the `hub` fixture, directly or through another fixture, with `hub`."""
    for item in items:
        if "hub" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hub)


@pytest.fixture(autouse=True)
def _offline_unless_hub(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any Hub request raise `OfflineModeIsEnabled`, so no test reaches the network by accident."""
    if "hub" not in request.fixturenames:
        set_offline(monkeypatch, True)


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubFixture]:
    """Serve an empty loopback Hub for one test and point `huggingface_hub` and `datasets` at it.

    A fresh server per test (milliseconds to start) keeps tests independent: no repo, cache or cached file-system
    listing survives from one test to the next.
    """
    home = tmp_path_factory.mktemp("hf_home")
    with LoopbackHub() as server:
        configure_clients(monkeypatch, server.endpoint, home, HUB_TOKEN)
        yield HubFixture(endpoint=server.endpoint, token=HUB_TOKEN, home=home, server=server)


# ======================================================================================================================
# End of the Hub section.
# ======================================================================================================================


# ======================================================================================================================
# Threads: tests run two at a time (`pytest -n 2` on 2 cores); tiny models run fastest on one thread each.
# ======================================================================================================================


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_worker() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
