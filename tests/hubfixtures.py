"""Fixtures for the hub tests (test_hub.py, test_hub_convert.py): a local hub (hubserver.HubServer) that the
real huggingface_hub client talks to, with HF_ENDPOINT/HF_HOME pointed at it and every other host refused.

No test touches the network: HF_ENDPOINT is the local server, HF_HOME a temporary directory, and no token from
the machine is used. The client reads its settings at import, so the fixture sets them on
`huggingface_hub.constants`, which is what rtnq.hub.client.HubConfig.from_env reads too.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from hubserver import HubServer
from huggingface_hub import constants
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import set_client_factory

from rtnq import synthetic
from rtnq.hub.client import Retry

FAST = Retry(tries=3, delay=0.01, max_delay=0.02)
TEST_SECONDS = 60


@pytest.fixture(autouse=True)
def _bounded():
    """Every test here ends within TEST_SECONDS, whatever the server or the client does."""
    def expire(signum, frame):
        raise TimeoutError(f"test ran past {TEST_SECONDS}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("hubsrc") / "tiny", synthetic.SampleSpec(shards=3))


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory) -> Path:
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("hubsrc1") / "one", synthetic.SampleSpec(shards=1))


@pytest.fixture
def hub(model_dir, tmp_path, monkeypatch):
    server = HubServer().start()
    server.add_repo("org/tiny", model_dir, tags=("v1",))
    server.add_repo("org/gated", model_dir, gated=True)
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # hf_hub_url builds on it
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    set_client_factory(_local_only_client)  # a fresh connection pool, and no request can leave 127.0.0.1
    yield server
    set_client_factory(hf_http.default_client_factory)
    server.stop()


def _local_only_client():
    """The client's own session, plus a guard: a request for any other host fails the test instead of leaving."""

    def refuse(request):
        if request.url.host != "127.0.0.1":
            raise AssertionError(f"a test tried to reach {request.url}")

    client = hf_http.default_client_factory()
    client.event_hooks["request"].append(refuse)
    return client


