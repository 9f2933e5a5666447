"""The operations settings: the endpoint's address, and secrets kept out of Settings."""

from __future__ import annotations

import pytest

from ingestd import errors
from ingestd.cli import _settings, build_parser
from ingestd.settings import load_settings, read_secret


def test_endpoint_address_defaults_env_and_flags() -> None:
    s = load_settings(None, environ={})
    assert (s.metrics_host, s.metrics_port) == ("127.0.0.1", 9464)
    env = {"INGESTD_METRICS_HOST": "0.0.0.0", "INGESTD_METRICS_PORT": "9100"}
    s = load_settings(None, environ=env)
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9100)
    args = build_parser().parse_args(["run", "--metrics-host", "::1", "--metrics-port", "0"])
    assert args.metrics_host == "::1" and args.metrics_port == 0


def test_cli_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_METRICS_HOST", "0.0.0.0")
    monkeypatch.delenv("INGESTD_CONFIG", raising=False)
    s = _settings(build_parser().parse_args(["run", "--metrics-host", "127.0.0.2"]))
    assert s.metrics_host == "127.0.0.2"


@pytest.mark.parametrize("port", [-1, 65536])
def test_metrics_port_out_of_range(port: int) -> None:
    with pytest.raises(errors.ConfigError, match="metrics_port"):
        load_settings(None, environ={}, overrides={"metrics_port": port})


def test_secrets_are_read_but_not_kept() -> None:
    env = {"INGESTD_WRITER_PASSWORD": "pw", "EMPTY": ""}
    assert read_secret("INGESTD_WRITER_PASSWORD", env) == "pw"
    assert read_secret("EMPTY", env) is None
    assert read_secret("MISSING", env) is None
    s = load_settings(None, environ=env)
    assert "pw" not in repr(s)
