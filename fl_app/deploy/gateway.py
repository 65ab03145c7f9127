"""The SuperLink's public face: an nginx reverse proxy that serves the Fleet API and nothing else.

Flower 1.41's SuperLink serves three APIs on one HTTP port: Fleet (``/v1/fleet/``, what SuperNodes
use), Control (``/v1/control/``: register and unregister node keys, list, submit and stop runs)
and Runtime (what its SuperExec and ServerApps use). Open-source Flower does not authenticate the
Control API: anyone who reaches that port with the CA certificate can register a key of their own,
unregister the operator's nodes, list runs, or submit a run, i.e. code that every node executes.
SuperNode authentication covers the Fleet API only.

So a deployment made with ``scripts/edge.py`` never exposes the SuperLink itself::

    edge machines ──TLS──> HOST:PORT (nginx, public)  ── /v1/fleet/* only, POST ──┐
                                                                                  ▼
    operator (on the host, or ssh -L) ──TLS──> 127.0.0.1:CONTROL_PORT  (flower-superlink:
                                               Fleet, Control and Runtime APIs, loopback only)

* the SuperLink listens on ``127.0.0.1:CONTROL_PORT`` only, with TLS and SuperNode authentication;
* nginx listens on the public address with the same certificate, forwards the *normalised*
  request path of ``POST /v1/fleet/<name>`` (so ``/v1/fleet/../control/…`` and percent-encoded
  variants resolve before the check, and the SuperLink receives the path nginx checked), verifies
  the SuperLink's certificate against the project's CA on the way in, forwards ``GET /health``
  (so that nodes and ``edge.py wait`` can tell whether the SuperLink is up), and answers 404 to
  every other path (Control, Runtime, documentation) without forwarding it;
* an operator on another machine reaches Control through an SSH tunnel
  (``ssh -N -L CONTROL_PORT:127.0.0.1:CONTROL_PORT user@host``): the firewall opens only PORT.

Anyone with a shell on the SuperLink's host can still reach the loopback port: that host is the
operator's. nginx comes from Debian's package (``nginx-light``); :func:`ensure_nginx` installs it
when it is missing and this process may (root with ``apt-get``), and says what to do otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NGINX_PACKAGE = "nginx-light"
NGINX_SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")
INSTALL_TIMEOUT_S = 600.0
DEFAULT_MAX_BODY_MB = 512
DEFAULT_CONTROL_PORT = 9093

# Flower's Fleet HTTP routes (flwr/superlink/routers/fleet/router.py): lower-case words and hyphens.
FLEET_PATH_PATTERN = r"^/v1/fleet/[a-z][a-z-]*$"


class GatewayError(RuntimeError):
    """The gateway cannot be set up: nginx is missing and cannot be installed, or it will not start."""


def find_nginx() -> str | None:
    """The nginx binary on PATH or in the usual system folders, or ``None``."""
    found = shutil.which("nginx")
    if found:
        return found
    for folder in NGINX_SEARCH_PATH:
        candidate = Path(folder) / "nginx"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _apt_get(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *arguments], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)


def install_nginx() -> str:
    """``apt-get install nginx-light`` (root only), without starting Debian's own nginx service:
    when the system has no ``policy-rc.d``, one that denies service starts is in place for the
    install. Returns the binary's path."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise GatewayError(
            "nginx is not installed and this process cannot install it (it needs root and apt-get); "
            f"install it once with: sudo apt-get install -y {NGINX_PACKAGE}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# fl-keras: no service starts while nginx installs\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        install = ["install", "-y", "--no-install-recommends", NGINX_PACKAGE]
        result = _apt_get(install, env)
        if result.returncode != 0:  # a fresh machine has no package lists yet
            _apt_get(["update"], env)
            result = _apt_get(install, env)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    found = find_nginx()
    if result.returncode != 0 or found is None:
        raise GatewayError(f"apt-get install {NGINX_PACKAGE} failed: {(result.stdout + result.stderr)[-1500:]}")
    return found


def ensure_nginx(install: bool = True) -> str:
    """The nginx binary; installed first (see :func:`install_nginx`) when missing and ``install``."""
    found = find_nginx()
    if found is not None:
        return found
    if not install:
        raise GatewayError(f"nginx is not installed: sudo apt-get install -y {NGINX_PACKAGE}")
    return install_nginx()


@dataclass(frozen=True)
class GatewaySpec:
    """What the gateway serves: ``public_host:public_port`` (TLS with ``certificate``/``key``), in
    front of the SuperLink on ``127.0.0.1:superlink_port`` whose certificate ``ca`` signed.
    ``max_body_mb`` bounds one request (a pushed model chunk)."""

    public_host: str
    public_port: int
    superlink_port: int
    certificate: Path
    key: Path
    ca: Path
    max_body_mb: int = DEFAULT_MAX_BODY_MB

    def __post_init__(self) -> None:
        for name in ("public_port", "superlink_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ValueError(f"gateway {name.replace('_', '-')}={port}: a TCP port is 1..65535")
        if self.public_port == self.superlink_port and self.public_host in ("127.0.0.1", "0.0.0.0", "localhost"):
            raise ValueError(
                f"gateway port {self.public_port} and the SuperLink's loopback port are the same: choose two ports"
            )
        if not 1 <= self.max_body_mb <= 4096:
            raise ValueError(f"gateway max-body-mb={self.max_body_mb}: allowed 1..4096")
        for name in ("certificate", "key", "ca"):
            path = getattr(self, name)
            if not Path(path).is_file():
                raise FileNotFoundError(f"gateway {name} {path} is missing (make it with scripts/edge.py certs)")
            # nginx reads relative paths from its prefix (the gateway folder), not from here
            object.__setattr__(self, name, Path(path).resolve())
        for name in ("certificate", "key", "ca", "public_host"):
            if any(c in str(getattr(self, name)) for c in ";{}\"'\n\\"):
                raise ValueError(f"gateway {name} {getattr(self, name)!r} holds a character nginx would misread")


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(spec: GatewaySpec, prefix: Path, *, run_as_root: bool) -> str:
    """The nginx configuration for ``spec``, with every file nginx writes under ``prefix``.

    nginx checks the SuperLink's certificate for the name ``localhost`` (nginx 1.22 matches DNS
    names only, not IP addresses; :func:`~fl_app.deploy.operator.make_server_cert` always adds it).

    A master process started as root hands the workers to ``nobody`` (they need no file: the
    master reads the certificates and keys)."""
    user = "user nobody nogroup;\n" if run_as_root else ""
    temp = prefix / "tmp"
    return f"""# written by fl_app.deploy.gateway: the public face of the SuperLink (Fleet API only)
{user}daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix / "access.log"};
    server_tokens off;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    client_max_body_size {spec.max_body_mb}m;
    upstream superlink {{
        server 127.0.0.1:{spec.superlink_port};
        keepalive 16;
    }}
    server {{
        listen {_listen_address(spec.public_host, spec.public_port)} ssl;
        ssl_certificate {spec.certificate};
        ssl_certificate_key {spec.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:fleet:1m;
        # how both forwarding locations reach the SuperLink (inherited by them)
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host 127.0.0.1;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {spec.ca};
        proxy_ssl_name localhost;
        proxy_ssl_session_reuse on;
        location ~ {FLEET_PATH_PATTERN} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink$uri;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location = /health {{
            limit_except GET {{ deny all; }}
            proxy_pass https://superlink/health;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def write_config(spec: GatewaySpec, prefix: str | Path) -> Path:
    """Write ``<prefix>/nginx.conf`` (and the folders nginx writes to); returns its path."""
    prefix = Path(prefix).resolve()
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o700)
    config = prefix / "nginx.conf"
    config.write_text(render_config(spec, prefix, run_as_root=os.geteuid() == 0), encoding="utf-8")
    return config


def nginx_command(nginx: str, config: Path) -> list[str]:
    """nginx in the foreground on ``config``; ``-e`` sends the start-up errors (before the
    configuration names its own log) to stderr instead of the system's log folder."""
    return [nginx, "-e", "stderr", "-p", str(config.parent), "-c", str(config)]


def check_config(nginx: str, config: Path) -> None:
    """``nginx -t`` on ``config``: raise :class:`GatewayError` with nginx's own words when invalid."""
    result = subprocess.run([*nginx_command(nginx, config), "-t"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise GatewayError(f"nginx refused {config}: {(result.stdout + result.stderr).strip()[-1500:]}")


def wait_listening(host: str, port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once something accepts TCP connections on ``host:port``; raise :class:`GatewayError`
    when ``process`` (the gateway) exits first or ``timeout`` passes."""
    import socket

    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((target, port), timeout=1.0):
                return
        except OSError:
            pass
        if process.poll() is not None:
            raise GatewayError(f"nginx exited with {process.returncode} before it listened on {host}:{port}")
        if time.monotonic() > deadline:
            raise GatewayError(f"nginx did not listen on {host}:{port} within {timeout:g} s")
        time.sleep(0.1)
