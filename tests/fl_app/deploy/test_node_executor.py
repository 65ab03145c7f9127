"""The warm executor (fl_app.deploy.node_executor): the FAB check and one task, with Flower's
Runtime API calls replaced by fakes (real processes: tests/fl_app/deploy/test_deployment.py)."""

from __future__ import annotations

import io
import itertools
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.constant import SubStatus

from fl_app.deploy import node_executor
from fl_app.deploy.node_worker import code_digest
from tests.fakes import instruction

ROOT = Path(__file__).resolve().parents[3]


def _fab(
    client_app: str = "fl_app.client_app:app", change: str | None = None, extra: dict[str, bytes] | None = None
) -> bytes:
    """A FAB (zip) of this checkout's sources, as ``flwr build`` packs them; ``change`` appends a
    comment to that file; ``extra`` adds files (path: bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        pyproject = (ROOT / "pyproject.toml").read_text().replace('"fl_app.client_app:app"', f'"{client_app}"')
        fab.writestr("pyproject.toml", pyproject)
        for package in ("fl_app", "strategies"):
            for path in sorted((ROOT / package).rglob("*.py")):
                name = str(path.relative_to(ROOT))
                data = path.read_bytes() + (b"\n# changed\n" if name == change else b"")
                fab.writestr(name, data)
        fab.writestr("README.md", "not code")
        for name, data in (extra or {}).items():
            fab.writestr(name, data)
    return buffer.getvalue()


def test_the_fab_digest_is_the_installed_code_digest_and_any_change_shows():
    assert node_executor.fab_code_digest(_fab()) == code_digest()
    assert node_executor.fab_code_digest(_fab(change="strategies/core/checks.py")) != code_digest()


def test_the_fab_check_names_what_differs_and_decides_once_per_fab():
    calls = itertools.count()

    def digest() -> str:
        next(calls)
        return code_digest()

    check = node_executor.FabCheck(digest)
    assert check.problem("a", _fab()) is None
    assert check.problem("a", b"not even a zip: the verdict for 'a' is remembered") is None
    assert "sources differ" in check.problem("b", _fab(change="fl_app/client_app.py"))
    assert "its ClientApp is 'other.app:app'" in check.problem("c", _fab(client_app="other.app:app"))
    assert next(calls) == 2  # two FABs with our ClientApp compared their sources


def test_a_users_module_the_run_config_names_must_be_the_node_copy(tmp_path):
    """A user's model package outside fl_app (e.g. examples/ for examples.breast_cancer.model) runs
    from the node's copy: the FAB's copy must be byte-equal; files of packages the run config does
    not name (a script the developer edited) and files the node cannot import are left alone."""
    user = tmp_path / "mypkg" / "model.py"
    user.parent.mkdir()
    user.write_bytes(b"def build(input_shape, output_spec): ...\n")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "bench.py").write_bytes(b"old = 1\n")
    check = node_executor.FabCheck(search_path=[str(tmp_path)])
    config = {"model": "mypkg.model:build", "dataset": "digits", "learning-rate": 0.1}
    same = _fab(extra={"mypkg/model.py": user.read_bytes(), "scripts/bench.py": b"edited = 2\n"})
    assert check.problem("same", same, config) is None
    assert check.problem("not-on-node", _fab(extra={"mypkg/other.py": b"x = 1\n"}), config) is None
    edited = _fab(extra={"mypkg/model.py": b"def build(*a): return None\n"})
    assert check.problem("edited", edited, config) == f"its mypkg/model.py differs from this node's {user}"
    assert check.problem("edited", edited, {"model": "mlp"}) is None  # not named: not this run's code


def test_user_packages_are_the_top_level_packages_of_named_references():
    config = {
        "model": "examples.breast_cancer.model:build",
        "callbacks": "mycb:make",
        "strategy": "strategies.examples:Custom",
        "dataset": "digits",
        "output-dir": "/tmp/a:b",
        "seed": 3,
    }
    assert node_executor.user_packages(config) == {"examples", "mycb"}


class _Fab:
    def __init__(self, content: bytes) -> None:
        self.content, self.hash_str = content, "f" * 64


class _FakeRuntime:
    """Stands in for the Runtime API functions ``run_task`` calls."""

    def __init__(self, monkeypatch, fab: bytes) -> None:
        import flwr.supercore.heartbeat as heartbeat
        import flwr.supernode.runtime.run_clientapp as run_clientapp

        self.message = instruction(node_id=1)
        self.context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        self.pushed: list[Message] = []
        self.outputs: list[tuple[str, str]] = []
        monkeypatch.setattr(
            run_clientapp, "pull_task_input", lambda client: (self.message, self.context, None, _Fab(fab))
        )
        monkeypatch.setattr(run_clientapp, "push_message", lambda client, reply, context: self.pushed.append(reply))
        monkeypatch.setattr(
            run_clientapp,
            "push_task_output",
            lambda client, context, sub_status, details: self.outputs.append((sub_status, details)),
        )
        monkeypatch.setattr(heartbeat, "HeartbeatSender", _NoHeartbeat)
        monkeypatch.setattr(node_executor.WarmExecutor, "_client", lambda self, interceptors: _Closable())


class _NoHeartbeat:
    def __init__(self, _fn) -> None:
        self.is_running = False

    def start(self) -> None:
        self.is_running = True

    def stop(self) -> None:
        self.is_running = False


class _Closable:
    def close(self) -> None:
        pass


def test_a_task_of_this_nodes_app_runs_in_process_and_its_reply_is_pushed(monkeypatch):
    runtime = _FakeRuntime(monkeypatch, _fab())
    seen = []

    def app(message: Message, context: Context) -> Message:
        seen.append(message)
        return Message(RecordDict({"arrays": ArrayRecord([np.zeros(3)])}), reply_to=message)

    executor = node_executor.WarmExecutor("127.0.0.1:1", client_app=app)
    executor.run_task("token")
    executor.run_task("token")
    assert seen == [runtime.message, runtime.message]  # the same loaded app, twice
    assert len(runtime.pushed) == 2 and not runtime.pushed[0].has_error()
    assert runtime.outputs == [(SubStatus.COMPLETED, "")] * 2


def test_each_task_logs_its_phases(monkeypatch):
    _FakeRuntime(monkeypatch, _fab())
    lines = []
    monkeypatch.setattr(node_executor, "log", lambda level, fmt, *args, **kw: lines.append(fmt % args))
    app = lambda message, context: Message(RecordDict(), reply_to=message)  # noqa: E731
    node_executor.WarmExecutor("127.0.0.1:1", client_app=app).run_task("token")
    (line,) = lines
    assert line.startswith("[warm executor] task 1 done in ")
    phases = [part.split(" ")[0:-2] for part in line.split(": ", 1)[1].split(", ")]
    assert [" ".join(p) for p in phases] == ["pull", "check", "app", "push reply", "push output", "close"]


def test_phase_seconds_are_the_gaps_between_marks():
    assert node_executor.phase_seconds(10.0, [("pull", 10.25), ("app", 11.0)]) == "pull 0.250 s, app 0.750 s"
    assert node_executor.phase_seconds(1.0, []) == ""


def test_a_task_of_another_app_is_refused_with_an_error_reply_and_never_runs(monkeypatch):
    runtime = _FakeRuntime(monkeypatch, _fab(change="fl_app/task/models.py"))

    def app(message: Message, context: Context) -> Message:
        raise AssertionError("foreign code must not run")

    node_executor.WarmExecutor("127.0.0.1:1", client_app=app).run_task("token")
    (reply,) = runtime.pushed
    assert reply.has_error() and "ForeignApp" in reply.error.reason
    assert "runs only the app installed on it" in reply.error.reason and "sources differ" in reply.error.reason
    assert runtime.outputs[0][0] == SubStatus.FAILED


def test_an_exception_in_the_app_becomes_the_error_reply(monkeypatch):
    runtime = _FakeRuntime(monkeypatch, _fab())

    def app(message: Message, context: Context) -> Message:
        raise ValueError("label 12 is outside [0, 10)")

    node_executor.WarmExecutor("127.0.0.1:1", client_app=app).run_task("token")
    assert "label 12 is outside [0, 10)" in runtime.pushed[0].error.reason
    assert runtime.outputs == [(SubStatus.FAILED, runtime.pushed[0].error.reason)]


@pytest.mark.parametrize("isolation", ["thread", ""])
def test_a_bad_isolation_is_refused(isolation):
    from fl_app.deploy.operator import supernode_command

    with pytest.raises(ValueError, match="isolation must be"):
        supernode_command("127.0.0.1:1", insecure=True, isolation=isolation)
