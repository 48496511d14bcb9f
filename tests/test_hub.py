"""The Hub, only when named: one quick connection decides, and offline the process uses the local cache at once."""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from tuneguard import hub


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process that has not asked yet, and gets its offline setting back afterwards."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    loaded = sys.modules.get("datasets.config")  # use_hub sets it too
    if loaded is not None:
        monkeypatch.setattr(loaded, "HF_HUB_OFFLINE", loaded.HF_HUB_OFFLINE)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    hub.reachable.cache_clear()
    yield
    hub.reachable.cache_clear()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reachable_asks_the_endpoint_or_the_proxy(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.reachable()
        hub.reachable.cache_clear()
        monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{closed_port()}")
        assert not hub.reachable()
        hub.reachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")  # the proxy answers for the endpoint
        assert hub.reachable()
        hub.reachable.cache_clear()
        monkeypatch.delenv("HTTPS_PROXY")
        monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{port}")  # so does one for every scheme
        assert hub.reachable()
        hub.reachable.cache_clear()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # unless the endpoint is not to be proxied
        assert not hub.reachable()


def test_use_hub_goes_offline_once_and_says_so(fresh: None, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{closed_port()}")
    hub.use_hub()
    assert constants.HF_HUB_OFFLINE and constants.is_offline_mode()
    hub.use_hub()
    assert capsys.readouterr().err.count("cannot be reached from here") == 1


def test_unreachable_hub_model_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """No retries with a warning each (half a minute before): the cache is looked at, then one line."""
    env = {**os.environ, "HF_ENDPOINT": f"https://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "tuneguard.cli", "eval", "--model", "org/absent-model", "--tasks",
                           "arc_easy", "--limit", "2"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Retrying" not in done.stderr + done.stdout
    assert "cannot be reached from here" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "tuneguard: error: model.source: 'org/absent-model' is not a local path and is not in the local HF cache, "
        "and the Hugging Face Hub could not be reached")
