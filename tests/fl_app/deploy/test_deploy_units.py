"""Unit tests of the deployment tooling: PKI, commands, connections, the warm worker's protocol."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fl_app.deploy import node_worker
from fl_app.deploy import operator as deploy
from fl_app.deploy.launcher import stop_process_tree
from fl_app.task.data import DataFileError

ROOT = Path(__file__).resolve().parents[3]


def test_superlink_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    ca_pem, ca_key = deploy.make_ca(tmp_path)
    cert_pem, key = deploy.make_server_cert(tmp_path, ca_pem, ca_key, ["localhost", "10.0.0.5", "fl.example.org"])
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    # localhost and 127.0.0.1 are always named: the gateway and the operator reach the SuperLink there
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(ca_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="neither a host name nor an IP"):
        deploy.make_server_cert(tmp_path, ca_pem, ca_key, ["http://x"])
    only_loopback, _ = deploy.make_server_cert(tmp_path, ca_pem, ca_key, [" "])
    names = x509.load_pem_x509_certificate(only_loopback.read_bytes()).extensions
    assert names.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "localhost"
    ]


def test_node_keys_are_what_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    private, public = deploy.make_node_keys(tmp_path, "node-0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert try_load_public_key(public)  # the check `flwr supernode register` runs
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="plain file name"):
        deploy.make_node_keys(tmp_path, "../evil")


def test_regenerated_private_keys_are_0600_whatever_was_there(tmp_path):
    """A key file left 0644 (or a symlink planted at its path) does not survive regeneration."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("ca.key", "superlink.key"):
        (tmp_path / name).write_bytes(b"old")
        (tmp_path / name).chmod(0o644)
    (keys / "node-0").write_bytes(b"old")
    (keys / "node-0").chmod(0o644)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not a key")
    elsewhere.chmod(0o644)
    (keys / "node-1").symlink_to(elsewhere)

    ca_pem, ca_key = deploy.make_ca(tmp_path)
    _, server_key = deploy.make_server_cert(tmp_path, ca_pem, ca_key, ["localhost"])
    written = [ca_key, server_key, *(deploy.make_node_keys(keys, n)[0] for n in ("node-0", "node-1"))]
    for path in written:
        assert not path.is_symlink() and oct(path.stat().st_mode & 0o777) == "0o600", path
        assert path.read_bytes() != b"old"
    assert elsewhere.read_bytes() == b"not a key"  # the symlink was replaced, not written through
    assert sorted(p.name for p in keys.iterdir()) == ["node-0", "node-0.pub", "node-1", "node-1.pub"]


def test_connection_config_is_valid_toml(tmp_path):
    deploy.write_connection(tmp_path, "edge", "10.0.0.5:9092", root_certificates=tmp_path / "ca.pem")
    deploy.write_connection(tmp_path, "lab", "127.0.0.1:9093", insecure=True, default=False)
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "edge"
    assert config["superlink"]["edge"] == {
        "address": "10.0.0.5:9092",
        "root-certificates": str((tmp_path / "ca.pem").resolve()),
    }
    assert config["superlink"]["lab"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert config["superlink"]["local"] == {"address": ":local:"}
    with pytest.raises(ValueError, match="either root_certificates"):
        deploy.write_connection(tmp_path, "x", "h:1")


def test_commands_are_secure_unless_insecure_is_asked_for(tmp_path):
    with pytest.raises(ValueError, match="needs certs_dir"):
        deploy.superlink_command()
    with pytest.raises(FileNotFoundError, match="ca.pem is missing"):
        deploy.superlink_command(certs_dir=tmp_path)
    ca, ca_key = deploy.make_ca(tmp_path)
    deploy.make_server_cert(tmp_path, ca, ca_key, ["localhost"])
    command = deploy.superlink_command(certs_dir=tmp_path, port=9100)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert command[command.index("--ssl-certfile") + 1] == str(tmp_path / "superlink.pem")
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" in deploy.superlink_command(insecure=True)

    with pytest.raises(ValueError, match="needs root_certificates"):
        deploy.supernode_command("h:1")
    node = deploy.supernode_command(
        "h:9092",
        runtime_port=9111,
        root_certificates=ca,
        private_key="k",
        node_config={"data-path": "/d/x.npz", "partition-id": 2},
    )
    assert node[node.index("--node-config") + 1] == 'data-path="/d/x.npz" partition-id=2'
    assert node[node.index("--port") + 1] == "9111" and "--insecure" not in node
    assert node[node.index("--auth-supernode-private-key") + 1] == "k"
    with pytest.raises(ValueError, match="may not contain"):
        deploy.format_node_config({"data-path": 'a"b'})


def test_node_files_hold_the_simulation_partitions(tmp_path):
    from fl_app.config.settings import Settings
    from fl_app.task.data import federated_data

    settings = Settings(num_partitions=3, partitioner="iid")
    paths = deploy.write_node_files(tmp_path, settings)
    data = federated_data(settings)
    assert [p.name for p in paths] == ["node-0.npz", "node-1.npz", "node-2.npz"]
    with np.load(paths[1]) as archive:
        np.testing.assert_array_equal(archive["y"], data.y[data.partitions[1]])
        assert archive["x"].shape[1:] == (8, 8, 1)


# --------------------------------------------------------------------------- warm worker protocol

worker_app = ClientApp()


@worker_app.train()
def _train(msg: Message, context: Context) -> Message:
    if context.node_config.get("data-path") == "bad":
        raise DataFileError("data file 'bad' holds no examples")
    assert node_worker.NODE_CONFIG_KEY not in context.node_config  # the worker runs it directly
    weights = [w * 2 for w in msg.content["arrays"].to_numpy_ndarrays()]
    context.state["seen"] = MetricRecord({"count": 1})
    return Message(
        RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg
    )


def _wait_for_socket(socket_path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def worker(tmp_path):
    socket_path = tmp_path / "private" / "w.sock"  # the worker creates private/ with mode 0700
    thread = threading.Thread(
        target=node_worker.serve, args=(socket_path, f"{__name__}:worker_app"), kwargs={"warm_up": False}, daemon=True
    )
    thread.start()
    _wait_for_socket(socket_path)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    return socket_path


def _message_and_context(socket_path, data_path="good"):
    message = Message(
        RecordDict({"arrays": ArrayRecord([np.ones(3, np.float32)])}), dst_node_id=7, message_type="train"
    )
    context = Context(
        run_id=1,
        node_id=7,
        state=RecordDict(),
        run_config={},
        node_config={"data-path": data_path, node_worker.NODE_CONFIG_KEY: str(socket_path)},
    )
    return message, context


def test_worker_runs_the_message_and_returns_reply_and_state(worker):
    message, context = _message_and_context(worker)
    calls = []
    reply = node_worker.keras_worker_mod(message, context, lambda m, c: calls.append(m))
    assert calls == []  # not run in-process
    np.testing.assert_array_equal(reply.content["arrays"].to_numpy_ndarrays()[0], 2.0)
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert context.state["seen"]["count"] == 1
    assert oct(worker.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(node_worker.key_path(worker).stat().st_mode & 0o777) == "0o600"


def test_worker_errors_come_back_under_the_same_name(worker):
    """Flower's error reply reads ``<class 'module.Name'>:<'text'>``: the same as without a worker."""
    message, context = _message_and_context(worker, data_path="bad")
    with pytest.raises(Exception, match="holds no examples") as raised:
        node_worker.keras_worker_mod(message, context, lambda m, c: None)
    assert str(type(raised.value)) == str(DataFileError)


def test_no_worker_or_other_code_runs_in_process(worker, tmp_path, monkeypatch):
    fallback = object()
    message, context = _message_and_context(tmp_path / "absent" / "w.sock")
    monkeypatch.setattr(node_worker, "CONNECT_TIMEOUT_S", 0.2)
    assert node_worker.keras_worker_mod(message, context, lambda m, c: fallback) is fallback
    message, context = _message_and_context(worker)
    answer = node_worker.handle(node_worker.Request("other code", 0, message, context), worker_app)
    assert answer.status == "code-mismatch"


def test_worker_refuses_a_client_without_the_key(worker):
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Client(str(worker), family="AF_UNIX", authkey=b"wrong key" * 4)
    # and it still serves the right one afterwards
    message, context = _message_and_context(worker)
    assert node_worker.keras_worker_mod(message, context, lambda m, c: None) is not None


# --------------------------------------------------------------------------- socket squatting


def _squat(directory, mode=0o755, key_mode=0o644):
    """What another local user did with the old fixed paths: a directory, a key they know, and a
    listener with that key that would answer the ClientApp."""
    from multiprocessing.connection import Listener

    directory.mkdir(mode=mode)
    directory.chmod(mode)
    socket_path = directory / "w.sock"
    key = node_worker.key_path(socket_path)
    key.write_bytes(b"k" * 32)
    key.chmod(key_mode)
    return socket_path, Listener(str(socket_path), family="AF_UNIX", authkey=b"k" * 32)


def test_the_client_never_uses_a_squatted_socket(tmp_path):
    """A socket directory open to others, or a key file open to others, is refused by name
    before the key is read: the squatter's listener never sees a connection."""
    socket_path, squatter = _squat(tmp_path / "open-dir")
    with squatter:
        message, context = _message_and_context(socket_path)
        with pytest.raises(node_worker.UnsafeWorkerPath, match=r"open-dir has mode 0755, open to group or others"):
            node_worker.keras_worker_mod(message, context, lambda m, c: None)
        socket_path.parent.chmod(0o700)  # a private directory, but a key others could have written
        with pytest.raises(node_worker.UnsafeWorkerPath, match=r"w\.sock\.key has mode 0644"):
            node_worker.keras_worker_mod(message, context, lambda m, c: None)
        key = node_worker.key_path(socket_path)
        key.unlink()
        key.symlink_to(tmp_path / "elsewhere.key")
        with pytest.raises(node_worker.UnsafeWorkerPath, match="cannot be opened safely"):
            node_worker.keras_worker_mod(message, context, lambda m, c: None)
        squatter._listener._socket.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing ever connected to it
            squatter._listener._socket.accept()


def test_the_client_refuses_a_directory_of_another_owner(tmp_path, monkeypatch):
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    monkeypatch.setattr(node_worker.os, "getuid", lambda: os.stat(directory).st_uid + 1)
    message, context = _message_and_context(directory / "w.sock")
    with pytest.raises(node_worker.UnsafeWorkerPath, match=r"belongs to uid \d+, not to this user"):
        node_worker.keras_worker_mod(message, context, lambda m, c: None)


def test_the_worker_refuses_a_squatted_or_taken_socket(tmp_path, worker):
    socket_path, squatter = _squat(tmp_path / "open-dir")
    squatter.close()
    with pytest.raises(node_worker.UnsafeWorkerPath, match="mode 0755"):
        node_worker.serve(socket_path, f"{__name__}:worker_app", warm_up=False)
    linked = tmp_path / "linked"
    linked.symlink_to(tmp_path / "private-target", target_is_directory=True)
    (tmp_path / "private-target").mkdir(mode=0o700)
    with pytest.raises(node_worker.UnsafeWorkerPath, match="is a symlink"):
        node_worker.serve(linked / "w.sock", f"{__name__}:worker_app", warm_up=False)
    with pytest.raises(node_worker.UnsafeWorkerPath, match="another worker already serves"):
        node_worker.serve(worker, f"{__name__}:worker_app", warm_up=False)
    message, context = _message_and_context(worker)  # the first worker is untouched
    assert node_worker.keras_worker_mod(message, context, lambda m, c: None) is not None


def test_default_socket_directory_is_private_and_per_user(tmp_path, monkeypatch):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert node_worker.default_socket_path(9094) == runtime / "fl-keras" / "worker-9094.sock"
    runtime.chmod(0o755)  # a runtime directory others may enter is not used
    monkeypatch.setattr(node_worker.tempfile, "gettempdir", lambda: str(tmp_path))
    assert node_worker.default_socket_path(9094) == tmp_path / f"fl-keras-{os.getuid()}" / "worker-9094.sock"


def test_worker_process_exits_non_zero_and_the_supernode_is_not_started(tmp_path):
    """Real processes: ``python -m fl_app.deploy.node_worker`` refuses a squatted directory with
    exit code 2, and ``edge.py supernode`` then refuses to start the SuperNode."""
    socket_path, squatter = _squat(tmp_path / "open-dir")
    squatter.close()
    env = deploy.deployment_env(tmp_path / "home")
    worker = subprocess.run(
        [sys.executable, "-m", "fl_app.deploy.node_worker", "--socket", str(socket_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 2 and f"refusing to start: worker directory {socket_path.parent}" in worker.stderr
    edge = subprocess.run(
        [
            *(sys.executable, str(ROOT / "scripts" / "edge.py"), "supernode", "--insecure"),
            *("--superlink", "127.0.0.1:1", "--runtime-port", "1", "--worker-socket", str(socket_path)),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert edge.returncode == 2, edge.stdout + edge.stderr
    assert "supernode: not started: the Keras worker could not own its socket" in edge.stderr
    assert "flower-supernode" not in edge.stdout  # the SuperNode's command was never run


def test_worker_process_owns_a_fresh_private_socket(tmp_path):
    """Real process, happy path: the worker creates its directory 0700 and its key 0600 and says
    so through the pipe, before importing the app or TensorFlow."""
    socket_path = tmp_path / "fresh" / "w.sock"
    process = deploy.start_worker(
        socket_path, deploy.deployment_env(tmp_path / "home"), log_file=tmp_path / "worker.log", cwd=ROOT
    )
    try:
        assert oct(socket_path.parent.stat().st_mode & 0o777) == "0o700"
        assert oct(node_worker.key_path(socket_path).stat().st_mode & 0o777) == "0o600"
        assert node_worker.read_key(socket_path) and socket_path.is_socket()
    finally:
        stop_process_tree(process)
    assert not socket_path.exists() and not node_worker.key_path(socket_path).exists()


def test_the_launcher_never_prints_an_earlier_runs_summary(tmp_path, capsys):
    import json
    import time

    from fl_app.deploy.launcher import print_summary

    run = tmp_path / "run-1"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"final centralized accuracy": 0.97}))
    (tmp_path / "latest").symlink_to(run.name)
    print_summary(tmp_path, since=time.time() + 60)  # a run launched after that one wrote nothing
    out = capsys.readouterr().out
    assert "0.97" not in out and "This run wrote no run directory" in out
    print_summary(tmp_path, since=time.time() - 60)
    assert "0.97" in capsys.readouterr().out
