"""Edge deployment: certificates, node keys, and the commands that start SuperLink and SuperNodes.

A deployment is one SuperLink on a server and one SuperNode per edge machine::

    CA (ca.pem, ca.key)                         made once, kept by the operator
    SuperLink certificate (superlink.pem/.key)  signed by the CA, valid for the server's names/IPs
    node key pair per SuperNode (<name>, <name>.pub)
                                                EC P-384 in OpenSSH format; the public half is
                                                registered on the SuperLink (``flwr supernode
                                                register``), the private half stays on the node

The SuperLink serves the Fleet, Control and Runtime APIs over TLS on one port and, with
``--enable-supernode-auth``, accepts only SuperNodes whose public key was registered. Each
SuperNode verifies the SuperLink's certificate against ``ca.pem`` and signs its requests with its
private key. ``--insecure`` (no TLS, no node authentication) is only ever used when asked for.

Everything here is standard library plus ``cryptography`` (a dependency of flwr); nothing imports
TensorFlow. ``scripts/edge.py`` is the operator's command line around these functions.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_DAYS = 365
CA_DAYS = 3650


# --------------------------------------------------------------------------- certificates and keys


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` (a private key) so that ``path`` is mode 0600 after every write.

    Opening an existing file with ``O_CREAT`` keeps its old mode (a regenerated key would stay
    0644), and a symlink at ``path`` would be followed. So the key goes to a fresh temporary file in
    the same folder (``mkstemp`` creates it 0600 with ``O_EXCL``) and replaces ``path`` by rename:
    the new key is never readable by others, and whatever was at ``path`` is replaced, not written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fl-keras"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(directory: str | Path, common_name: str = "fl-keras CA") -> tuple[Path, Path]:
    """A self-signed CA (EC P-384): writes ``ca.pem`` and ``ca.key``; returns their paths."""
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return cert_path, key_path


def split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Host names and IP addresses, for the certificate's subject alternative names."""
    names, ips = [], []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            ips.append(ipaddress.ip_address(host))
        except ValueError:
            if any(c in host for c in " /:@"):
                raise ValueError(f"'{host}' is neither a host name nor an IP address") from None
            names.append(host)
    if not names and not ips:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address")
    return names, ips


def make_server_cert(
    directory: str | Path,
    ca_cert: str | Path,
    ca_key: str | Path,
    hosts: Sequence[str],
    name: str = "superlink",
) -> tuple[Path, Path]:
    """A server certificate signed by the CA, valid for ``hosts`` (names and IPs).

    Writes ``<name>.pem`` and ``<name>.key``. SuperNodes and the ``flwr`` CLI reach the SuperLink
    by one of these names or addresses; gRPC/HTTPS refuse any other. ``localhost`` and
    ``127.0.0.1`` are always added: the gateway, the SuperLink's SuperExec and the operator (on
    the server or through an SSH tunnel) reach the SuperLink itself on loopback.
    """
    directory = Path(directory)
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key} is not an elliptic-curve CA key (make_ca writes P-384 keys)")
    dns_names, ips = split_hosts(hosts)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    san = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(dns_names[0] if dns_names else ips[0])))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return cert_path, key_path


def make_node_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: EC P-384, OpenSSH format (as ``ssh-keygen -t ecdsa``).

    Writes ``<name>`` (private, mode 600) and ``<name>.pub``; returns (private, public).
    """
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"node key name must be a plain file name, got '{name}'")
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path, public_path = directory / name, directory / f"{name}.pub"
    _write_private(private_path, private)
    public_path.write_bytes(public + f" {name}\n".encode())
    return private_path, public_path


# --------------------------------------------------------------------------- flwr CLI connections


def write_connection(
    flwr_home: str | Path,
    name: str,
    address: str,
    *,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
    default: bool = True,
) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.

    The ``flwr`` CLI (``flwr run``, ``flwr supernode register``, ``flwr ls``) reaches a deployed
    SuperLink through such a connection: its address, and either the CA certificate that signed
    the SuperLink's certificate or ``insecure = true``.
    """
    if insecure == (root_certificates is not None):
        raise ValueError("a connection needs either root_certificates (TLS) or insecure=True")
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = flwr_home / "config.toml"
    sections = _read_sections(config)
    body = [f'address = "{address}"']
    if insecure:
        body.append("insecure = true")
    else:
        if root_certificates is None:
            raise ValueError("a TLS connection needs root_certificates (the CA's ca.pem)")
        body.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    sections[f"superlink.{name}"] = body
    header = sections.setdefault("superlink", [])
    if default or not any(line.startswith("default") for line in header):
        header[:] = [line for line in header if not line.startswith("default")]
        header.insert(0, f'default = "{name}"')
    if "superlink.local" not in sections:
        sections["superlink.local"] = ['address = ":local:"']
    text = "\n\n".join(f"[{title}]\n" + "\n".join(lines) for title, lines in sections.items())
    config.write_text(text + "\n", encoding="utf-8")
    return config


def _read_sections(config: Path) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    if not config.exists():
        return sections
    current = None
    for raw in config.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            sections[current] = []
        elif line and current is not None:
            sections[current].append(line)
    return sections


# --------------------------------------------------------------------------- commands


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


FLOWER_SUPEREXEC_TASK_POLL_S = "1.0"  # Flower 1.41's default
NODE_SUPEREXEC_TASK_POLL_S = "0.05"


def deployment_env(flwr_home: str | Path | None = None, *, superlink: bool = False) -> dict[str, str]:
    """Environment for SuperLink, SuperNodes and ``flwr``: this environment's tools first on PATH,
    runtime dependency installation off (the locked environment is used as is), and a SuperNode's
    SuperExec (``--flower-runtime`` nodes: it launches a ClientApp process per message) looking
    for a task every ``NODE_SUPEREXEC_TASK_POLL_S`` = 0.05 s instead of Flower's 1 s (Flower's own
    setting ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 0.01-60 s; a value already in the environment is
    kept). With ``superlink``, the SuperLink's SuperExec keeps Flower's 1 s: it launches one
    ServerApp per run, and polling 20 times a second costs both processes about 8 ms of CPU per
    look for the whole run (measured on the simulation launcher, :mod:`fl_app.deploy.launcher`)."""
    env = dict(os.environ)
    env.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.setdefault(
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", FLOWER_SUPEREXEC_TASK_POLL_S if superlink else NODE_SUPEREXEC_TASK_POLL_S
    )
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def superlink_command(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    certs_dir: str | Path | None = None,
    insecure: bool = False,
    node_auth: bool = True,
    database: str | Path | None = None,
    log_file: str | Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS (``certs_dir`` holds ca.pem, superlink.pem, superlink.key)
    and SuperNode authentication on, unless ``insecure`` is asked for explicitly."""
    command = [
        _bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        command.append("--insecure")
    else:
        if certs_dir is None:
            raise ValueError(
                "a TLS SuperLink needs certs_dir (ca.pem, superlink.pem, superlink.key); "
                "pass insecure=True only if you accept an unencrypted link"
            )
        certs = Path(certs_dir)
        for file in ("ca.pem", "superlink.pem", "superlink.key"):
            if not (certs / file).is_file():
                raise FileNotFoundError(f"{certs / file} is missing (make it with scripts/edge.py certs)")
        command += [
            "--ssl-ca-certfile",
            str(certs / "ca.pem"),
            "--ssl-certfile",
            str(certs / "superlink.pem"),
            "--ssl-keyfile",
            str(certs / "superlink.key"),
        ]
        if node_auth:
            command.append("--enable-supernode-auth")
    if database is not None:
        command += ["--database", str(database)]
    if log_file is not None:
        command += ["--log-file", str(log_file)]
    return command


def format_node_config(node_config: Mapping[str, object]) -> str:
    """``{"data-path": "/d.npz", "partition-id": 0}`` → ``data-path="/d.npz" partition-id=0``."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if '"' in text:
                raise ValueError(f"node-config value of '{key}' may not contain '\"': {text}")
            parts.append(f'{key}="{text}"')
    return " ".join(parts)


def supernode_command(
    superlink: str,
    *,
    runtime_port: int = 9094,
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    insecure: bool = False,
    node_config: Mapping[str, object] | None = None,
    max_wait_time: float | None = None,
    short_polls: bool = True,
    isolation: str = "subprocess",
) -> list[str]:
    """``flower-supernode`` reaching ``superlink`` (HOST:PORT) over TLS, authenticated by
    ``private_key``, with its own ``node_config`` (e.g. ``data-path``), and its Runtime API on
    ``127.0.0.1:runtime_port`` (one free port per SuperNode on a host). It runs through
    :mod:`fl_app.deploy.supernode_entry` (Flower's entry point with short, growing polls), or, with
    ``short_polls=False``, as Flower's own ``flower-supernode`` (for comparisons). ``isolation``
    ``"subprocess"``: the SuperNode starts Flower's SuperExec (a ``flwr-clientapp`` process per
    message); ``"process"``: it does not, and :func:`executor_command` runs the messages."""
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
    command = [sys.executable, "-m", "fl_app.deploy.supernode_entry"] if short_polls else [_bin("flower-supernode")]
    command += ["--superlink", superlink, "--host", "127.0.0.1", "--port", str(runtime_port)]
    if insecure:
        command.append("--insecure")
    else:
        if root_certificates is None:
            raise ValueError(
                "a TLS SuperNode needs root_certificates (the CA's ca.pem); "
                "pass insecure=True only if you accept an unencrypted link"
            )
        command += ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            command += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        command += ["--node-config", format_node_config(node_config)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    if isolation != "subprocess":
        command += ["--isolation", isolation]
    return command


def executor_command(runtime_port: int) -> list[str]:
    """The warm ClientApp runtime (:mod:`fl_app.deploy.node_executor`) of the SuperNode whose
    Runtime API is on ``127.0.0.1:runtime_port`` (that SuperNode runs with ``isolation="process"``)."""
    return [sys.executable, "-m", "fl_app.deploy.node_executor", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]


def register_command(public_key: str | Path, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register <key.pub> <connection>``."""
    command = [_bin("flwr"), "supernode", "register", str(public_key), connection]
    if name:
        command += ["--name", name]
    return command


def superlink_answers(
    address: str, *, ca: str | Path | None = None, insecure: bool = False, timeout: float = 1.0
) -> bool:
    """Whether the SuperLink at ``address`` (HOST:PORT) answers its health check, over TLS
    verified against ``ca`` unless ``insecure``."""
    import httpx

    scheme, verify = ("http", False) if insecure else ("https", str(ca) if ca is not None else True)
    try:
        return httpx.get(f"{scheme}://{address}/health", verify=verify, timeout=timeout).is_success
    except httpx.HTTPError:
        return False


def supernode_list_command(connection: str) -> list[str]:
    """``flwr supernode list <connection> --format json``: the SuperLink's nodes, each with its
    status (registered, online, offline, unregistered) and when it last came online or went off."""
    return [_bin("flwr"), "supernode", "list", connection, "--format", "json"]


def start(
    command: Sequence[str],
    env: Mapping[str, str],
    log_file: str | Path,
    cwd: str | Path | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen:
    """Start ``command`` in its own session (so that its whole group can be stopped by PID)."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handle = log_file.open("ab")
    try:
        return subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    finally:
        handle.close()


WORKER_OWNS_TIMEOUT_S = 120.0


def start_worker(
    socket_path: str | Path,
    env: Mapping[str, str],
    *,
    log_file: str | Path | None = None,
    cwd: str | Path | None = None,
    timeout: float = WORKER_OWNS_TIMEOUT_S,
) -> subprocess.Popen:
    """Start a SuperNode's warm Keras worker on ``socket_path`` and return once it owns the socket.

    With ``log_file`` the worker gets its own session and that log (as :func:`start`); without, it
    stays in the caller's process group and writes to the caller's terminal. A SuperNode must not
    start when its worker cannot own its socket (a squatted, foreign or group-readable directory,
    or a live worker on it): then the worker is stopped and
    :class:`~fl_app.deploy.node_worker.UnsafeWorkerPath` is raised with the reason to fix.
    """
    from fl_app.deploy.launcher import stop_process_tree
    from fl_app.deploy.node_worker import UnsafeWorkerPath, wait_until_owned

    read_fd, write_fd = os.pipe()
    command = [
        sys.executable,
        "-m",
        "fl_app.deploy.node_worker",
        "--socket",
        str(socket_path),
        "--owned-fd",
        str(write_fd),
    ]
    try:
        if log_file is None:
            process = subprocess.Popen(command, env=dict(env), cwd=cwd, pass_fds=(write_fd,))
        else:
            process = start(command, env, log_file, cwd=cwd, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    if wait_until_owned(read_fd, timeout):
        return process
    try:
        process.wait(timeout=15)  # it closed the pipe without owning the socket: it is exiting
    except subprocess.TimeoutExpired:  # neither owned its socket nor exited within the timeout
        stop_process_tree(process)
    where = f"; see {log_file}" if log_file is not None else " (its message is above)"
    raise UnsafeWorkerPath(
        f"the Keras worker could not own its socket {socket_path} within {timeout:g} s "
        f"(exit code {process.returncode}){where}"
    )


# --------------------------------------------------------------------------- demo data


def write_node_files(directory: str | Path, settings=None) -> list[Path]:
    """Write each partition of a pooled data set as ``node-<i>.npz`` (arrays ``x``, ``y``).

    For trying a deployment with data the nodes did not collect themselves: the partitions are
    exactly those of the simulation with the same settings (data set, partitioner, seed).
    """
    import numpy as np

    from fl_app.config.settings import Settings
    from fl_app.task.data import federated_data

    settings = settings or Settings()
    data = federated_data(settings)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, index in enumerate(data.partitions):
        path = directory / f"node-{i}.npz"
        np.savez(path, x=data.x[index], y=data.y[index])
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- loopback harness


class LoopbackDeployment:
    """A SuperLink and SuperNodes as real processes on 127.0.0.1, with TLS and node authentication
    (unless ``insecure``): for tests, benchmarks and trying a deployment on one machine.

    Every process leads its own session and is stopped by PID on :meth:`close`. ``app`` is the
    Flower app directory that :meth:`submit` sends.
    """

    CONNECTION = "edge"

    def __init__(
        self,
        root: str | Path,
        app: str | Path,
        *,
        insecure: bool = False,
        node_auth: bool = True,
        host: str = "127.0.0.1",
        cert_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        gateway: bool = True,
        flower_polls: bool = False,
    ) -> None:
        from fl_app.deploy.launcher import free_port

        self.root = Path(root)
        self.app = Path(app)
        self.insecure = insecure
        self.node_auth = node_auth and not insecure
        self.gateway = gateway and not insecure
        self.host = host
        self.cert_hosts = list(cert_hosts)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # with the gateway, the SuperLink itself (Control API included) listens on loopback only
        self.control_port = self.port
        while self.gateway and self.control_port == self.port:
            self.control_port = free_port()
        self.control_address = f"127.0.0.1:{self.control_port}"
        self.flwr_home = self.root / "flwr_home"
        self.certs = self.root / "certs"
        self.env = deployment_env(self.flwr_home)
        self.flower_polls = flower_polls  # Flower's own 3 s / 0.5 s / 1 s polls, for comparisons
        if flower_polls:
            self.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = FLOWER_SUPEREXEC_TASK_POLL_S
        self.processes: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.executors: dict[str, subprocess.Popen] = {}
        self.superlink: subprocess.Popen | None = None

    # -- lifecycle
    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start_superlink()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_superlink(self, timeout: float = 90.0) -> None:
        import time

        import httpx

        if not self.insecure:
            ca, ca_key = make_ca(self.certs)
            make_server_cert(self.certs, ca, ca_key, self.cert_hosts)
        write_connection(
            self.flwr_home,
            self.CONNECTION,
            self.control_address,
            root_certificates=None if self.insecure else self.certs / "ca.pem",
            insecure=self.insecure,
        )
        command = superlink_command(
            host="127.0.0.1" if self.gateway else self.host,
            port=self.control_port,
            certs_dir=None if self.insecure else self.certs,
            insecure=self.insecure,
            node_auth=self.node_auth,
        )
        env = dict(self.env)  # its SuperExec launches one ServerApp: Flower's 1 s poll (deployment_env)
        if "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in os.environ:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = FLOWER_SUPEREXEC_TASK_POLL_S
        self.superlink = start(command, env, self.root / "superlink.log", cwd=self.app)
        self.processes.append(self.superlink)
        scheme = "http" if self.insecure else "https"
        verify: str | bool = False if self.insecure else str(self.certs / "ca.pem")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{scheme}://{self.control_address}/health", verify=verify, timeout=1.0).is_success:
                    if self.gateway:
                        self.start_gateway()
                    return
            except httpx.HTTPError:
                pass
            if self.superlink.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with {self.superlink.returncode}: {self.log('superlink')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink not healthy after {timeout:.0f} s")
            time.sleep(0.3)

    def start_gateway(self) -> None:
        """nginx on the public address in front of the SuperLink (see :mod:`fl_app.deploy.gateway`)."""
        from fl_app.deploy import gateway

        spec = gateway.GatewaySpec(
            public_host=self.host,
            public_port=self.port,
            superlink_port=self.control_port,
            certificate=self.certs / "superlink.pem",
            key=self.certs / "superlink.key",
            ca=self.certs / "ca.pem",
        )
        nginx = gateway.ensure_nginx()
        config = gateway.write_config(spec, self.root / "gateway")
        gateway.check_config(nginx, config)
        process = self._start(gateway.nginx_command(nginx, config), "gateway")
        gateway.wait_listening(self.host, self.port, process)

    def close(self) -> None:
        from fl_app.deploy.launcher import stop_process_tree

        for process in reversed(self.processes):
            stop_process_tree(process)

    def _start(self, command: Sequence[str], name: str) -> subprocess.Popen:
        process = start(command, self.env, self.root / f"{name}.log", cwd=self.app)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    # -- nodes
    def node_keys(self, name: str, register: bool = True) -> tuple[Path, Path]:
        private, public = make_node_keys(self.root / "keys", name)
        if register:
            result = subprocess.run(
                register_command(public, self.CONNECTION, name),
                env=self.env,
                cwd=self.app,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                raise RuntimeError(f"registering {public} failed: {result.stdout}{result.stderr}")
        return private, public

    def start_worker(self, name: str, wait: bool = True) -> Path:
        """A warm Keras worker for node ``name``; returns its socket path (once it is ready, with
        ``wait``; else call :meth:`wait_worker` later, so that several warm up at once)."""
        socket_path = self.root / "workers" / f"{name}.sock"
        self.workers[name] = start_worker(
            socket_path, self.env, log_file=self.root / f"{name}-worker.log", cwd=self.app
        )
        self.processes.append(self.workers[name])
        if wait:
            self.wait_worker(name)
        return socket_path

    def wait_worker(self, name: str, timeout: float = 300.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while "Keras worker ready" not in self.log(f"{name}-worker"):
            if self.workers[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start: {self.log(f'{name}-worker')[-2000:]}")
            time.sleep(0.3)

    def start_node(
        self,
        name: str,
        node_config: Mapping[str, object],
        *,
        private_key: Path | None = None,
        worker: Path | None = None,
        executor: bool = False,
        superlink: str | None = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen:
        """SuperNode ``name`` (log ``<name>.log``), reaching ``superlink`` (default: the loopback
        address), its command prefixed by ``prefix`` (e.g. ``ip netns exec NS``). With ``executor``
        its messages run in a warm :mod:`fl_app.deploy.node_executor` process (log
        ``<name>-executor.log``, same prefix) instead of a ``flwr-clientapp`` process each."""
        if executor and worker is not None:
            raise ValueError("a node runs its messages in the warm executor or through a worker, not both")
        from fl_app.deploy.launcher import free_port
        from fl_app.deploy.node_worker import NODE_CONFIG_KEY

        config = dict(node_config)
        if worker is not None:
            config[NODE_CONFIG_KEY] = str(worker)
        runtime_port = free_port()
        command = supernode_command(
            superlink or self.address,
            runtime_port=runtime_port,
            root_certificates=None if self.insecure else self.certs / "ca.pem",
            private_key=private_key,
            insecure=self.insecure,
            node_config=config,
            short_polls=not self.flower_polls,
            isolation="process" if executor else "subprocess",
        )
        node = self._start([*prefix, *command], name)
        if executor:
            self.executors[name] = self._start([*prefix, *executor_command(runtime_port)], f"{name}-executor")
        return node

    def node_id(self, name: str, timeout: float = 300.0) -> int:
        """The node id the SuperLink gave SuperNode ``name`` (from its log)."""
        import re
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"SuperNode ID: (\d+)", self.log(name))
            if match:
                return int(match.group(1))
            time.sleep(0.3)
        raise RuntimeError(f"SuperNode {name} reported no node id: {self.log(name)[-2000:]}")

    # -- runs
    def flwr(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args], env=self.env, cwd=self.app, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, run_config: str) -> int:
        """``flwr run <app> edge -c <run_config>``; returns the run id."""
        import json

        result = self.flwr("run", str(self.app), self.CONNECTION, "--format", "json", "-c", run_config)
        try:
            return int(json.loads(result.stdout)["run-id"])
        except (ValueError, KeyError) as err:
            raise RuntimeError(f"flwr run failed: {result.stdout}{result.stderr}") from err

    def status(self, run_id: int) -> str:
        import json

        result = self.flwr("ls", self.CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(result.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def wait(self, run_id: int, timeout: float) -> str:
        """Poll until the run finishes (or ``timeout``); return its status."""
        import time

        deadline = time.monotonic() + timeout
        status = self.status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(2.0)
            status = self.status(run_id)
        return status

    def stop_run(self, run_id: int) -> None:
        result = self.flwr("stop", str(run_id), self.CONNECTION)
        if result.returncode != 0:
            raise RuntimeError(f"flwr stop failed: {result.stdout}{result.stderr}")
