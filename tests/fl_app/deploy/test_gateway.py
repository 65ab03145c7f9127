"""The gateway's configuration (nginx in front of the SuperLink: the public port serves the Fleet
API only). The intruder is played with real processes in ``test_edge_commands.py``; every
deployment test trains through the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_app.deploy import gateway

ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- configuration


@pytest.fixture
def certs(tmp_path):
    from fl_app.deploy.operator import make_ca, make_server_cert

    ca, ca_key = make_ca(tmp_path / "certs")
    make_server_cert(tmp_path / "certs", ca, ca_key, ["localhost", "127.0.0.1"])
    return tmp_path / "certs"


def _spec(certs: Path, **changes) -> gateway.GatewaySpec:
    values: dict = {
        "public_host": "0.0.0.0",
        "public_port": 9092,
        "superlink_port": 9093,
        "certificate": certs / "superlink.pem",
        "key": certs / "superlink.key",
        "ca": certs / "ca.pem",
    }
    values.update(changes)
    return gateway.GatewaySpec(**values)


def test_the_configuration_forwards_fleet_posts_only_and_verifies_the_superlink(certs, tmp_path):
    text = gateway.render_config(_spec(certs), tmp_path, run_as_root=False)
    assert "listen 0.0.0.0:9092 ssl;" in text
    assert "server 127.0.0.1:9093;" in text
    # the one forwarding location matches the normalised path of a Fleet route, POST only
    assert text.count("proxy_pass") == 2  # the Fleet routes, and GET /health
    assert "location = /health {\n            limit_except GET" in text
    assert f"location ~ {gateway.FLEET_PATH_PATTERN}" in text and "limit_except POST" in text
    assert "proxy_pass https://superlink$uri;" in text  # the path nginx checked, not the raw one
    assert "proxy_ssl_verify on;" in text and f"proxy_ssl_trusted_certificate {certs / 'ca.pem'};" in text
    assert "location / {\n            return 404;" in text
    assert "user nobody" not in text
    assert "user nobody nogroup;" in gateway.render_config(_spec(certs), tmp_path, run_as_root=True)
    assert "listen [::]:9092 ssl;" in gateway.render_config(_spec(certs, public_host="::"), tmp_path, run_as_root=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"public_port": 0}, "public-port=0"),
        ({"superlink_port": 70000}, "superlink-port=70000"),
        ({"public_port": 9093}, "the same"),
        ({"max_body_mb": 0}, "max-body-mb=0"),
        ({"public_host": "1.2.3.4; include /etc/passwd"}, "nginx would misread"),
    ],
)
def test_bad_gateway_settings_are_refused_by_name(certs, changes, message):
    with pytest.raises(ValueError, match=message):
        _spec(certs, **changes)


def test_relative_certificate_paths_become_absolute(certs, monkeypatch):
    """nginx would read them relative to its prefix (the gateway folder), where they are not."""
    monkeypatch.chdir(certs.parent)
    spec = _spec(
        certs, certificate=Path("certs/superlink.pem"), key=Path("certs/superlink.key"), ca=Path("certs/ca.pem")
    )
    assert spec.certificate == certs / "superlink.pem" and spec.key.is_absolute() and spec.ca.is_absolute()
    assert f"ssl_certificate {certs / 'superlink.pem'};" in gateway.render_config(spec, certs, run_as_root=False)


def test_missing_certificate_is_refused(certs):
    with pytest.raises(FileNotFoundError, match="edge.py certs"):
        _spec(certs, key=certs / "absent.key")


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/v1/fleet/pull-messages", True),
        ("/v1/fleet/register-node", True),
        ("/v1/control/list-runs", False),
        ("/v1/fleet/", False),
        ("/v1/fleet/../control/list-runs", False),
        ("/v1/runtime/pull-messages", False),
        ("/v1/fleet/Pull", False),
        ("/health", False),
    ],
)
def test_the_fleet_pattern_admits_route_names_only(path, forwarded):
    import re

    assert bool(re.match(gateway.FLEET_PATH_PATTERN, path)) is forwarded


def test_without_root_or_apt_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gateway, "find_nginx", lambda: None)
    monkeypatch.setattr(gateway.os, "geteuid", lambda: 1000)
    with pytest.raises(gateway.GatewayError, match="apt-get install -y nginx-light"):
        gateway.ensure_nginx()
    with pytest.raises(gateway.GatewayError, match="not installed"):
        gateway.ensure_nginx(install=False)
