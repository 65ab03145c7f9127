"""fl-keras-run --profile's timeline (fl_app.deploy.startup_timeline) on a recorded stream."""

from __future__ import annotations

import io

from fl_app.deploy.output_filter import NoiseFilter, copy_filtered
from fl_app.deploy.startup_timeline import StartupTimeline

STREAM = [
    "Using SuperLink: local (127.0.0.1:5)\n",
    "Successfully started run 7\n",
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
    "\x1b[92mINFO \x1b[0m:      Run directory: /o/r\n",
    "\x1b[92mINFO \x1b[0m:      [round 0/3 0%] ETA - | central accuracy 0.09\n",
    "\x1b[36m(pid=26060)\x1b[0m [mutex.cc : 452] RAW: Lock blocking\n",
    "\x1b[36m(pid=26128)\x1b[0m I0000 00:00:1795932308.254057   26128 port.cc:153] oneDNN custom operations are on.\n",
    "\x1b[92mINFO \x1b[0m:      [round 1/3 33%] ETA 0:10 | central accuracy 0.65\n",
    "\x1b[92mINFO \x1b[0m:      [round 2/3 66%] ETA 0:01 | central accuracy 0.76\n",
    "\x1b[92mINFO \x1b[0m:      [round 3/3 100%] ETA 0:00 | central accuracy 0.81\n",
    "\x1b[92mINFO \x1b[0m:      === Summary =====\n",
]


def test_every_milestone_is_stamped_once_in_order_even_behind_the_noise_filter(monkeypatch):
    import fl_app.deploy.startup_timeline as module

    clock = iter(float(t) for t in range(100))
    timeline = StartupTimeline(started=0.0)
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))  # one line: one second
    shown = io.StringIO()
    copy_filtered(io.StringIO("".join(STREAM + STREAM)), shown, NoiseFilter(), [], timeline.observe)
    monkeypatch.undo()
    assert "port.cc" not in shown.getvalue()  # hidden from the display, seen by the timeline
    events = timeline.events
    assert events["flwr CLI connected to the SuperLink"] == 0.0  # the first time, not the repeat
    assert events["first actor imported TensorFlow"] == 6.0 and events["first Ray actor started"] == 5.0
    assert events["round 1 done (first fits, tracing; with Ray, the actors' imports)"] == 7.0
    table = timeline.table()
    assert "round 3 done (last round)" in table
    lines = table.splitlines()[3:]
    assert [float(line.split()[0]) for line in lines] == sorted(float(line.split()[0]) for line in lines)
    assert lines[1].split()[:2] == ["1.0", "1.0"]  # at 1 s, 1 s after the previous event


def test_the_launchers_own_marks_come_first_only():
    timeline = StartupTimeline()
    timeline.mark("local SuperLink answering")
    first = timeline.events["local SuperLink answering"]
    timeline.mark("local SuperLink answering")
    assert timeline.events["local SuperLink answering"] == first
