"""Fixtures for the context tests: the tiny model, a served model and fault proxies."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from context_servers import FaultProxy, ServedModel, save_tiny_model


@pytest.fixture(scope="session")
def tiny(llama_lm):  # type: ignore[no-untyped-def]
    """The session's tiny llama (random weights, ChatML template, 512 positions)."""
    return llama_lm


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """A real OpenAI-compatible server (`transformers serve`) for a tiny local model."""
    root = tmp_path_factory.mktemp("served")
    server = ServedModel(save_tiny_model(root / "tiny-model"), root / "serve.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy_factory(served: ServedModel) -> Iterator[Any]:
    proxies: list[FaultProxy] = []

    def make(**kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(served.api_base, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
