"""scripts/startup_vs_tff.py's pure parts: no TFF, nothing started."""

from __future__ import annotations

from tests.helpers import load_script


def run(side: str, repeat: int, wall: float, accuracy: float, steady: float, rss: float, code: int = 0) -> dict:
    return {
        "side": side,
        "repeat": repeat,
        "exit_code": code,
        "wall_s": wall,
        "steady_round_s": steady,
        "peak_rss_gib": rss,
        "peak_pss_gib": rss / 2,
        "accuracy": accuracy,
    }


def test_without_the_tff_venv_it_says_how_to_install_it_and_exits_2(capsys, tmp_path):
    script = load_script("startup_vs_tff")
    assert script.main(["--repeats", "1"]) == 2
    assert script.main(["--tff-python", str(tmp_path / "missing" / "python")]) == 2
    err = capsys.readouterr().err
    assert "tensorflow-federated==0.87.0" in err and "jaxlib==0.4.13" in err
    assert "is not an executable" in err
    assert not list(tmp_path.iterdir())  # nothing was started or written


def test_the_table_gives_each_repeat_the_means_their_ratio_and_the_acceptance_line():
    script = load_script("startup_vs_tff")
    runs = [
        run("app", 0, 30.0, 0.8607, 0.40, 3.0),
        run("tff", 0, 20.0, 0.8607, 0.20, 0.8),
        run("tff", 1, 22.0, 0.8607, 0.30, 0.9),
        run("app", 1, 34.0, 0.8607, 0.50, 3.2),
        run("app", 2, 5.0, 0.1, 0.1, 1.0, code=1),  # a failed run counts in no mean
    ]
    summary = script.summarize(runs)
    assert summary["app"]["wall_s"] == [30.0, 34.0] and summary["app"]["failed"] == 1
    assert summary["ratio"] == 32.0 / 21.0
    text = script.table(summary)
    assert "30.0, 34.0" in text and "20.0, 22.0" in text
    assert "1.52x" in text  # mean whole run
    assert "1.80x" in text  # steady round: 0.45 / 0.25
    assert "3.56x" in text  # peak RSS: 3.2 / 0.9 (largest of each side, failed runs included)
    assert text.splitlines()[-1] == "within 1.5x: no (app/TFF 1.52)"
    assert "failed runs" in text


def test_ratio_acceptance_and_order():
    script = load_script("startup_vs_tff")
    assert script.within(script.ratio(30.0, 20.0)) == "within 1.5x: yes"
    assert script.within(script.ratio(31.0, 20.0)) == "within 1.5x: no"
    assert script.within(script.ratio(None, 20.0)) == "within 1.5x: no (not measured)"
    assert script.ratio(1.0, 0.0) is None
    assert [script.order(i) for i in range(3)] == [("app", "tff"), ("tff", "app"), ("app", "tff")]
    assert script.steady_round([3.0, 0.5, 0.2, 0.4, 0.3]) == 0.35
    assert script.steady_round([3.0]) is None


def test_the_peers_json_line_and_the_apps_timeline_are_found_among_noise():
    script = load_script("startup_vs_tff")
    out = 'W0000 tensorflow noise {not json\n{"final_accuracy": 0.86, "round_s": [1.0]}\nshutdown noise\n'
    assert script.peer_result(out) == {"final_accuracy": 0.86, "round_s": [1.0]}
    assert script.peer_result("no result\n") is None
    log = "summary\n\nStart-up timeline (--profile): seconds from the command\n    at s\n   14.7  x\n"
    assert script.timeline_of(log).startswith("Start-up timeline") and script.timeline_of(log).endswith("x")
    assert script.timeline_of("summary only") == ""
