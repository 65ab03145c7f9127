"""Operator commands for an edge deployment: certificates, SuperLink, node keys, SuperNodes.

    uv run python scripts/edge.py certs --out deploy --hosts localhost,127.0.0.1 --nodes 3
    uv run python scripts/edge.py superlink --certs deploy --host 0.0.0.0 --port 9092
    uv run python scripts/edge.py connection --name edge --address 127.0.0.1:9092 --ca deploy/ca.pem
    uv run python scripts/edge.py register --connection edge deploy/keys/node-0.pub ...
    uv run python scripts/edge.py supernode --superlink 127.0.0.1:9092 --ca deploy/ca.pem \\
        --key deploy/keys/node-0 --data-path /data/local.npz --runtime-port 9094
    uv run python scripts/edge.py node-data --out deploy/data --nodes 3   # demo data files
    uv run python scripts/edge.py status      # what superlink/supernode started here, the nodes
    uv run python scripts/edge.py stop        # stop it all, whole process trees

TLS and SuperNode authentication are on unless ``--insecure`` is given. See docs/deployment.md
"Deploy on edge machines" for the whole procedure.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fl_app.deploy import node_worker, services
from fl_app.deploy import operator as deploy
from fl_app.deploy.process_tools import process_tree


def cmd_certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ca_pem, ca_key = out / "ca.pem", out / "ca.key"
    if ca_pem.exists() and ca_key.exists():
        print(f"CA kept: {ca_pem}")
    else:
        ca_pem, ca_key = deploy.make_ca(out)
        print(f"CA: {ca_pem} (private key {ca_key}: keep it off the edge devices)")
    cert, key = deploy.make_server_cert(out, ca_pem, ca_key, args.hosts.split(","))
    print(f"SuperLink certificate for {args.hosts}: {cert}, key {key}")
    names = [n for n in (args.node_names or "").split(",") if n] or [f"node-{i}" for i in range(args.nodes)]
    for name in names:
        private, public = deploy.make_node_keys(out / "keys", name)
        print(f"SuperNode key pair: {private} (copy to the node), {public} (register it)")
    return 0


def cmd_node_keys(args: argparse.Namespace) -> int:
    for name in args.names:
        private, public = deploy.make_node_keys(args.out, name)
        print(f"SuperNode key pair: {private}, {public}")
    return 0


def cmd_connection(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    config = deploy.write_connection(
        home,
        args.name,
        args.address,
        root_certificates=None if args.insecure else args.ca,
        insecure=args.insecure,
    )
    print(f"Connection '{args.name}' -> {args.address} written to {config}")
    return 0


def _exec(command: list[str], env: dict[str, str]) -> int:
    print("$ " + " ".join(command), flush=True)
    os.execvpe(command[0], command, env)
    return 1  # not reached


def _stop_children_on_signal(children: list[subprocess.Popen]) -> threading.Event:
    """On SIGTERM or Ctrl-C to this command (e.g. from ``edge.py stop``): set the returned event and
    terminate ``children`` (the list may still grow after this call)."""
    stopping = threading.Event()

    def stop(*_):
        stopping.set()
        for process in children:
            if process.poll() is None:
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return stopping


def _stop_own_tree(children: list[subprocess.Popen]) -> None:
    """Stop everything this command started, whole trees, not only ``children``: Flower's
    SuperExec, ServerApps and ClientApps run in sessions of their own under them; then reap."""
    services.stop_tree(process_tree(os.getpid())[1:], timeout=15)
    for process in children:
        process.wait(timeout=15)


def cmd_superlink(args: argparse.Namespace) -> int:
    if not args.insecure and not args.certs:
        sys.exit(
            "superlink: --certs DIR (ca.pem, superlink.pem, superlink.key) is required; "
            "--insecure only if you accept an unencrypted, unauthenticated link"
        )
    if args.insecure or args.no_gateway:
        print(
            "superlink: WARNING: no gateway: the Control API (register/unregister node keys, list and "
            f"submit runs) is open to anyone who reaches {args.host}:{args.port}",
            file=sys.stderr,
            flush=True,
        )
        command = deploy.superlink_command(
            host=args.host,
            port=args.port,
            certs_dir=args.certs,
            insecure=args.insecure,
            node_auth=not args.no_node_auth,
            database=args.database,
            log_file=args.log_file,
        )
        # exec keeps this PID: the record names the SuperLink itself, whatever wrapper started us
        services.record(
            args.state_dir,
            f"superlink-{args.port}",
            command,
            {"address": f"{args.host}:{args.port}", "tls": "off" if args.insecure else "on", "gateway": "none"},
        )
        return _exec(command, deploy.deployment_env(args.flwr_home, superlink=True))
    return _run_superlink_behind_gateway(args)


def _run_superlink_behind_gateway(args: argparse.Namespace) -> int:
    """The SuperLink on 127.0.0.1:--control-port, then nginx on --host:--port serving its Fleet API
    only (fl_app.deploy.gateway); both stay children of this command, which stops both when either
    exits or when it is asked to stop (SIGTERM, Ctrl-C, ``edge.py stop``)."""
    import time

    from fl_app.deploy import gateway

    certs = Path(args.certs)
    try:
        spec = gateway.GatewaySpec(
            public_host=args.host,
            public_port=args.port,
            superlink_port=args.control_port,
            certificate=certs / "superlink.pem",
            key=certs / "superlink.key",
            ca=certs / "ca.pem",
            max_body_mb=args.max_body_mb,
        )
        nginx = gateway.ensure_nginx()
        config = gateway.write_config(spec, Path(args.state_dir) / f"gateway-{args.port}")
        gateway.check_config(nginx, config)
    except (ValueError, OSError, gateway.GatewayError) as err:
        sys.exit(f"superlink: {err}")
    control = f"127.0.0.1:{args.control_port}"
    env = deploy.deployment_env(args.flwr_home, superlink=True)
    command = deploy.superlink_command(
        host="127.0.0.1",
        port=args.control_port,
        certs_dir=certs,
        node_auth=not args.no_node_auth,
        database=args.database,
        log_file=args.log_file,
    )
    services.record(
        args.state_dir,
        f"superlink-{args.port}",
        sys.argv,
        {"address": f"{args.host}:{args.port} (Fleet API, nginx)", "control": f"{control} (loopback)", "tls": "on"},
    )
    print("$ " + " ".join(command), flush=True)
    children: list[subprocess.Popen] = []
    stopping = _stop_children_on_signal(children)
    code = 1
    try:
        children.append(subprocess.Popen(command, env=env))
        deadline = time.monotonic() + 120
        while not deploy.superlink_answers(control, ca=certs / "ca.pem"):
            if stopping.is_set() or children[0].poll() is not None or time.monotonic() > deadline:
                if not stopping.is_set():
                    print("superlink: flower-superlink did not come up (its log is above)", file=sys.stderr)
                return 0 if stopping.is_set() else 1
            time.sleep(0.3)
        children.append(subprocess.Popen(gateway.nginx_command(nginx, config), env=env))
        try:
            gateway.wait_listening(args.host, args.port, children[1])
        except gateway.GatewayError as err:
            print(f"superlink: {err}; see {config.parent / 'error.log'}", file=sys.stderr)
            return 1
        print(
            f"SuperLink up. SuperNodes connect to {args.host}:{args.port} (nginx: Fleet API only, TLS). "
            f"The operator's flwr CLI uses {control} (Control API, loopback only; from another machine: "
            f"ssh -N -L {args.control_port}:127.0.0.1:{args.control_port} <this host>).",
            flush=True,
        )
        while not stopping.is_set():
            ended = [p for p in children if p.poll() is not None]
            if ended:
                name = "flower-superlink" if ended[0] is children[0] else "nginx (the gateway)"
                print(f"superlink: {name} exited with code {ended[0].returncode}; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        code = 0
        print("superlink: stopped on request", flush=True)
    finally:
        _stop_own_tree(children)
    return code


def cmd_register(args: argparse.Namespace) -> int:
    env = deploy.deployment_env(args.flwr_home)
    status = 0
    for key in args.keys:
        result = subprocess.run(deploy.register_command(key, args.connection, Path(key).stem), env=env, timeout=120)
        status = status or result.returncode
    return status


def cmd_supernode(args: argparse.Namespace) -> int:
    if not args.insecure and not args.ca:
        sys.exit("supernode: --ca ca.pem is required; --insecure only if the SuperLink runs without TLS")
    if not args.insecure and not args.key:
        print("warning: no --key: the SuperLink refuses this node if it enforces node authentication", file=sys.stderr)
    node_config: dict[str, object] = {}
    if args.data_path:
        node_config["data-path"] = str(Path(args.data_path).expanduser().resolve())
    if args.partition_id is not None:
        node_config["partition-id"] = args.partition_id
    # --no-worker and --worker-socket only make sense with Flower's SuperExec: they choose it
    args.flower_runtime = args.flower_runtime or args.no_worker or args.worker_socket is not None
    env = deploy.deployment_env(args.flwr_home)
    name = f"supernode-{args.runtime_port}"
    services.record(args.state_dir, name, sys.argv, {"superlink": args.superlink})
    try:
        return _run_supernode(args, node_config, env)
    finally:
        services.forget(args.state_dir, name)


def _run_supernode(args: argparse.Namespace, node_config: dict[str, object], env: dict[str, str]) -> int:
    """The SuperNode and what runs its messages: the warm executor (default), or with
    --flower-runtime Flower's SuperExec (a process per message) with the warm Keras worker (unless
    --no-worker). Returns the SuperNode's exit code, or 2 when the worker cannot own its socket (the
    SuperNode is then not started)."""
    worker = None
    if args.flower_runtime and not args.no_worker:
        socket_path = (
            Path(args.worker_socket) if args.worker_socket else node_worker.default_socket_path(args.runtime_port)
        )
        node_config[node_worker.NODE_CONFIG_KEY] = str(socket_path)
        try:
            worker = deploy.start_worker(socket_path, env)
        except node_worker.UnsafeWorkerPath as err:
            print(f"supernode: not started: {err}", file=sys.stderr)
            return 2
        print(f"Keras worker started: pid {worker.pid}, socket {socket_path}", flush=True)
    command = deploy.supernode_command(
        args.superlink,
        runtime_port=args.runtime_port,
        root_certificates=args.ca,
        private_key=args.key,
        insecure=args.insecure,
        node_config=node_config,
        max_wait_time=args.max_wait_time,
        isolation="subprocess" if args.flower_runtime else "process",
    )
    print("$ " + " ".join(command), flush=True)
    # All stay in this command's process group: stopping the group stops them all.
    supernode = subprocess.Popen(command, env=env)
    executor = None
    if not args.flower_runtime:
        executor = subprocess.Popen(deploy.executor_command(args.runtime_port), env=env)
        print(f"Warm executor started: pid {executor.pid}", flush=True)

    children = [process for process in (supernode, worker, executor) if process is not None]
    stopping = _stop_children_on_signal(children)
    try:
        code = _watch(args, supernode, stopping, companion=executor)
    finally:
        _stop_own_tree(children)
    return code


LINK_CHECK_INTERVAL_S = 5.0
SUPERLINK_LOST = 3


def _watch(
    args: argparse.Namespace,
    supernode: subprocess.Popen,
    stopping: threading.Event,
    companion: subprocess.Popen | None = None,
) -> int:
    """Wait for the SuperNode; return its exit code (0 when it was stopped on request: SIGTERM or
    Ctrl-C to this command, e.g. from ``edge.py stop``), 1 when ``companion`` (the warm executor,
    without which no message runs) exited, or ``SUPERLINK_LOST`` once the SuperLink has not
    answered for ``--max-wait-time`` seconds (Flower's SuperNode then logs "Giving up
    reconnection" but keeps running: measured with Flower 1.41)."""
    import time

    last_seen = time.monotonic()
    while True:
        try:
            code = supernode.wait(timeout=LINK_CHECK_INTERVAL_S)
        except subprocess.TimeoutExpired:
            if companion is not None and companion.poll() is not None and not stopping.is_set():
                print(
                    f"supernode: the warm executor exited with code {companion.returncode} (its log above says "
                    "why); stopping the SuperNode, exit code 1",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            if args.max_wait_time is None:
                continue
            if deploy.superlink_answers(args.superlink, ca=args.ca, insecure=args.insecure, timeout=2.0):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > args.max_wait_time:
                print(
                    f"supernode: the SuperLink at {args.superlink} has not answered for "
                    f"{time.monotonic() - last_seen:.0f} s (--max-wait-time {args.max_wait_time:g}); "
                    f"stopping the SuperNode, exit code {SUPERLINK_LOST}",
                    file=sys.stderr,
                    flush=True,
                )
                return SUPERLINK_LOST
            continue
        if stopping.is_set():
            print(f"supernode: stopped on request (flower-supernode's exit code {code})", flush=True)
            return 0
        if code != 0:
            print(
                f"supernode: flower-supernode exited with code {code} (its log above says why; "
                "'Failed to activate SuperNode' means the SuperLink does not know this node's key: register it)",
                file=sys.stderr,
                flush=True,
            )
        return code


def cmd_wait(args: argparse.Namespace) -> int:
    import time

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if deploy.superlink_answers(args.address, ca=args.ca, insecure=args.insecure):
            print(f"SuperLink at {args.address} is up")
            return 0
        time.sleep(0.5)
    print(f"SuperLink at {args.address} did not answer within {args.timeout:g} s", file=sys.stderr)
    return 1


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        stopped = services.stop(args.state_dir, args.names, timeout=args.timeout)
    except KeyError as err:
        print(f"stop: {err.args[0]}", file=sys.stderr)
        return 2
    if not stopped:
        print(f"Nothing recorded in {Path(args.state_dir) / services.STATE_FOLDER}: nothing to stop")
    for result in stopped:
        if not result.pids:
            print(f"{result.service.name}: was not running (record removed)")
            continue
        forced = f", {len(result.killed)} needed SIGKILL" if result.killed else ""
        print(
            f"{result.service.name}: stopped {len(result.pids)} processes ({' '.join(map(str, result.pids))}){forced}"
        )
    return 0


def _nodes(args: argparse.Namespace) -> str:
    """The SuperLink's nodes as `flwr supernode list` reports them (status, when last online)."""
    import json

    result = subprocess.run(
        deploy.supernode_list_command(args.connection),
        env=deploy.deployment_env(args.flwr_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        nodes = json.loads(result.stdout)["nodes"]
    except (ValueError, KeyError):
        reason = (result.stdout + result.stderr).strip().splitlines()
        return (
            f"    nodes: unknown (flwr supernode list {args.connection}: {reason[-1] if reason else result.returncode})"
        )
    if not nodes:
        return f"    nodes (connection '{args.connection}'): none registered or connected"
    lines = [f"    nodes (connection '{args.connection}'):"]
    for node in nodes:
        since = node["online-at"] if node["status"] == "online" else node["offline-at"]
        lines.append(f"      {node['node-id']}  {node['status']:<12} since {since}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    recorded = services.recorded(args.state_dir)
    if not recorded:
        print(f"Nothing recorded in {Path(args.state_dir) / services.STATE_FOLDER}")
        return 0
    everything_runs = True
    for service in recorded:
        pids = services.tree(service)
        details = ", ".join(f"{key} {value}" for key, value in service.details.items())
        if not pids:
            everything_runs = False
            print(f"{service.name}: NOT RUNNING ({details}; `edge.py stop {service.name}` removes the record)")
            continue
        print(f"{service.name}: running, {len(pids)} processes ({details})")
        for pid in pids:
            print(f"    {pid:>7}  {services.command_line(pid)[:160]}")
        if service.name.startswith("superlink"):
            print(_nodes(args))
    return 0 if everything_runs else 1


def cmd_node_data(args: argparse.Namespace) -> int:
    from fl_app.config.settings import Settings

    settings = Settings(dataset=args.dataset, num_partitions=args.nodes, partitioner=args.partitioner, seed=args.seed)
    for path in deploy.write_node_files(args.out, settings):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="scripts/edge.py", description=__doc__.split("\n")[0])
    sub = root.add_subparsers(dest="command", required=True)
    home = {"default": None, "help": "FLWR_HOME for the flwr CLI (default: $FLWR_HOME or ~/.flwr)"}
    state = {
        "default": "deploy",
        "help": "folder where edge.py records what it starts, for `stop` and `status` (default: deploy)",
    }

    p = sub.add_parser("certs", help="CA, SuperLink certificate and SuperNode key pairs")
    p.add_argument("--out", required=True, help="folder for ca.pem, superlink.pem/.key, keys/")
    p.add_argument(
        "--hosts",
        required=True,
        help="comma-separated names and IPs the SuperLink is reached by, e.g. localhost,127.0.0.1,10.0.0.5",
    )
    p.add_argument("--nodes", type=int, default=0, help="make key pairs node-0 .. node-(N-1)")
    p.add_argument("--node-names", default="", help="or: comma-separated key names")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("node-keys", help="one more SuperNode key pair")
    p.add_argument("--out", required=True)
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_node_keys)

    p = sub.add_parser("connection", help="a SuperLink connection for the flwr CLI")
    p.add_argument("--flwr-home", **home)
    p.add_argument("--name", default="edge")
    p.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca", help="the CA certificate (ca.pem)")
    p.add_argument("--insecure", action="store_true")
    p.set_defaults(func=cmd_connection)

    p = sub.add_parser("superlink", help="start a SuperLink (TLS and node authentication on)")
    p.add_argument("--flwr-home", **home)
    p.add_argument("--certs", help="folder with ca.pem, superlink.pem, superlink.key")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=9092, help="the public port: the Fleet API for SuperNodes")
    p.add_argument(
        "--control-port",
        type=int,
        default=9093,
        help="the SuperLink's own port on 127.0.0.1 (Control API: the operator's flwr CLI)",
    )
    p.add_argument(
        "--no-gateway",
        action="store_true",
        help="serve the SuperLink itself on --host:--port, Control API included (not behind nginx)",
    )
    p.add_argument("--max-body-mb", type=int, default=512, help="largest request the gateway forwards")
    p.add_argument("--database", help="SQLite file: registered nodes and runs survive a restart")
    p.add_argument("--log-file")
    p.add_argument("--no-node-auth", action="store_true", help="accept any SuperNode (TLS stays on)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication")
    p.add_argument("--state-dir", **state)
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("register", help="register SuperNode public keys on the SuperLink")
    p.add_argument("--flwr-home", **home)
    p.add_argument("--connection", default="edge")
    p.add_argument("keys", nargs="+", help="public key files (*.pub)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("supernode", help="start a SuperNode (and the warm executor that runs its messages)")
    p.add_argument("--flwr-home", **home)
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca", help="the CA certificate (ca.pem)")
    p.add_argument("--key", help="this node's private key (keys/node-<i>)")
    p.add_argument("--data-path", help="this node's .npz (x, y) or .csv data file")
    p.add_argument(
        "--partition-id", type=int, default=None, help="only for pooled demo data sets; also seeds local shuffling"
    )
    p.add_argument("--runtime-port", type=int, default=9094, help="one free port per SuperNode on a host")
    p.add_argument(
        "--flower-runtime",
        action="store_true",
        help="run each message in a fresh flwr-clientapp process started by Flower's SuperExec (Flower's default) "
        "instead of the warm executor (fl_app.deploy.node_executor); with the warm Keras worker unless --no-worker",
    )
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="Flower's runtime without the worker: import TensorFlow in every message's process (Flower's default)",
    )
    p.add_argument(
        "--worker-socket",
        help="Flower's runtime with the warm Keras worker on this socket, in a directory only this user may access "
        "(default with --flower-runtime: $XDG_RUNTIME_DIR/fl-keras/worker-<runtime-port>.sock, "
        "or <temp dir>/fl-keras-<uid>/worker-<runtime-port>.sock)",
    )
    p.add_argument("--insecure", action="store_true")
    p.add_argument(
        "--max-wait-time",
        type=float,
        default=None,
        help="seconds to keep retrying an unreachable SuperLink before exiting non-zero (default: retry forever)",
    )
    p.add_argument("--state-dir", **state)
    p.set_defaults(func=cmd_supernode)

    p = sub.add_parser("stop", help="stop what superlink/supernode started here, whole process trees")
    p.add_argument("--state-dir", **state)
    p.add_argument("--timeout", type=float, default=services.STOP_TIMEOUT_S, help="seconds before SIGKILL")
    p.add_argument("names", nargs="*", help="e.g. supernode-9094 superlink-9092 (default: all recorded)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="what superlink/supernode started here, and the SuperLink's nodes")
    p.add_argument("--state-dir", **state)
    p.add_argument("--flwr-home", **home)
    p.add_argument("--connection", default="edge", help="the flwr connection to list the SuperLink's nodes")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait until the SuperLink answers (TLS verified with --ca)")
    p.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca", help="the CA certificate (ca.pem)")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("node-data", help="demo: write each partition of a data set as node-<i>.npz")
    p.add_argument("--out", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--dataset", default="digits", choices=("digits", "synthetic"))
    p.add_argument("--partitioner", default="iid", choices=("iid", "dirichlet", "shards"))
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_node_data)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
