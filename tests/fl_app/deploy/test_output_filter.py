"""What ``fl-keras-run`` shows: start-up noise and Flower's repeated per-phase lines hidden (``--verbose`` shows it), the summary once,
``--help`` documenting ``--`` and every option."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

from fl_app.deploy import launcher
from fl_app.deploy.output_filter import NoiseFilter, copy_filtered, is_noise

# Lines of a default `fl-keras-run --clients 3 -- -c num-server-rounds=2` on a CPU machine (verbatim,
# colour codes included), before the filter.
NOISE_LINES = [
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
    "\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:",
    "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>",
    "/work/x/.venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future "
    "versions of Ray, Ray will no longer override accelerator visible devices env var if num_gpus=0 or num_gpus=None",
    "  warnings.warn(",
    "\x1b[36m(pid=4996)\x1b[0m WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "\x1b[36m(pid=4996)\x1b[0m I0000 00:00:1795928968.484631    4996 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results",
    "\x1b[36m(pid=4996)\x1b[0m I0000 00:00:1795928968.486219    4996 cudart_stub.cc:31] Could not find cuda drivers "
    "on your machine, GPU will not be used.\x1b[32m [repeated 2x across cluster]\x1b[0m",
    "\x1b[36m(ClientAppActor pid=4996)\x1b[0m E0000 00:00:1795929031.164088    4996 cuda_platform.cc:52] failed call "
    "to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1795929240.727616    7175 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
    "\x1b[36m(ClientAppActor pid=4994)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures",
    "\x1b[92mINFO \x1b[0m:      configure_evaluate: Sampled 3 nodes (out of 3)",
    "\x1b[92mINFO \x1b[0m:      aggregate_evaluate: Received 2 results and 1 failures",
]
RUN_LINES = [
    "Successfully started run 5846539300458252203",
    "\x1b[92mINFO \x1b[0m:      Run directory: /tmp/kk/out/20261129-050855-fedavg",
    "\x1b[92mINFO \x1b[0m:      [round 1/2 50%] ETA 0:04 | central accuracy 0.8468 loss 0.5504 | federated ...",
    "\x1b[93mWARNING \x1b[0m:   [round 1] failure: node 7: no reply within the round timeout (600 s)",
    "Traceback (most recent call last):",
    '  File "/work/x/fl_app/client_app.py", line 69, in train',
    "ValueError: model 'm' has 3 output units but the data has 10 classes",
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: ...",
    "\x1b[36m(ClientAppActor pid=4994)\x1b[0m E0000 00:00:1795929031.1 4994 my_op.cc:12] a user's own op failed",
]


def test_noise_is_hidden_and_the_run_is_not():
    assert [line for line in NOISE_LINES if not is_noise(line)] == []
    assert [line for line in RUN_LINES if is_noise(line)] == []
    shown = NoiseFilter()
    assert list(shown.lines([line + "\n" for line in NOISE_LINES + RUN_LINES])) == [line + "\n" for line in RUN_LINES]
    assert (shown.hidden, shown.shown) == (len(NOISE_LINES), len(RUN_LINES))


def test_copy_filtered_notes_the_summary_and_verbose_copies_all():
    text = "".join(line + "\n" for line in [*NOISE_LINES, "INFO :      === Summary =====", "strategy fedavg"])
    out, seen = io.StringIO(), []
    copy_filtered(io.StringIO(text), out, NoiseFilter(), seen)
    assert out.getvalue() == "INFO :      === Summary =====\nstrategy fedavg\n" and len(seen) == 1
    out = io.StringIO()
    copy_filtered(io.StringIO(text), out, None, [])
    assert out.getvalue() == text


def test_help_documents_every_option_and_the_double_dash():
    help_text = launcher.build_parser().format_help()
    for action in launcher.build_parser()._actions:
        for option in action.option_strings:
            assert option in help_text
        assert action.help, f"{action.option_strings} has no help"
    assert "Everything after `--` goes to `flwr run" in help_text and '-c "key=value' in help_text
    assert "--verbose" in help_text
    args, rest = launcher.build_parser().parse_known_args(["--verbose", "--clients", "3", "--", "-c", "x=1"])
    assert args.verbose and args.clients == 3 and rest == ["--", "-c", "x=1"]


def test_run_while_alive_filters_the_commands_output(capsys, tmp_path):
    script = tmp_path / "child.py"
    lines = [*NOISE_LINES[:3], "a line of the run", "=== Summary ====", "strategy fedavg"]
    script.write_text(
        f"import sys\nfor line in {lines!r}:\n    print(line, file=sys.stderr if 'pid' in line else sys.stdout)\n"
    )
    superlink = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        seen: list[str] = []
        noise = NoiseFilter()
        started = time.monotonic()
        code, lost = launcher.run_while_alive([sys.executable, str(script)], {}, Path.cwd(), superlink, 9, noise, seen)
        assert (code, lost) == (0, "") and time.monotonic() - started < 20
    finally:
        superlink.kill()
        superlink.wait()
    out = capsys.readouterr().out
    assert out == "a line of the run\n=== Summary ====\nstrategy fedavg\n"
    assert noise.hidden == 3 and len(seen) == 1
