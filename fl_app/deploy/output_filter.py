"""What ``fl-keras-run`` shows of ``flwr run --stream``: the run, without start-up noise.

A default run's stream carries, besides the app's own lines, what TensorFlow, Ray, CUDA and
Flower print when each worker starts: TensorFlow's oneDNN and ``cpu_feature_guard`` notes, the
``cudart_stub`` and red ``failed call to cuInit`` lines on machines without a GPU, absl's
"log messages before absl::InitializeLog()", Ray's accelerator ``FutureWarning`` and log
de-duplication hints, Flower's federation-size hints and its actors' "Manually terminating" at
the end. None says anything about the run. Flower's strategies also log four lines per round
(``configure_train: Sampled 3 nodes``, ``aggregate_train: Received 3 results and 0 failures``, and
the same for evaluation), which the app's progress line repeats (replied, failed), so that a round
is one line. By default the launcher drops the lines that match
:data:`NOISE` (:class:`NoiseFilter`); ``fl-keras-run --verbose`` shows everything.

An environment variable cannot do it: this TensorFlow (2.21) writes its start-up lines through
absl before absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL=2`` (which ``fl_app`` sets
anyway) still prints them (measured: the same oneDNN, ``cudart_stub`` and ``cuInit`` lines with it),
and Ray's and Flower's lines have no such switch.

Errors of the run itself (tracebacks, the app's warnings, failed replies) never match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO

ANSI = re.compile(r"\x1b\[[0-9;]*m")

NOISE: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        # TensorFlow / XLA / CUDA start-up, through absl (I/W/E + timestamp + file:line])
        r"^(\([^)]*pid=\d+\) )?[IWE]\d{4} [\d:.]+\s+\d+ (port|cudart_stub|cuda_platform|cuda_executor|cpu_feature_guard|"
        r"cuda_dnn|cuda_fft|cuda_blas|cuda_diagnostics|gpu_device|cpu_utils)\.cc:\d+\]",
        r"^(\([^)]*pid=\d+\) )?WARNING: All log messages before absl::InitializeLog\(\) is called",
        r"^(\([^)]*pid=\d+\) )?To enable the following instructions: .* rebuild TensorFlow",
        r"^(\([^)]*pid=\d+\) )?WARNING:absl:",
        # Ray
        r"ray/_private/worker\.py:\d+: FutureWarning: Tip: In future versions of Ray",
        r"^\s+warnings\.warn\($",
        r"Ray deduplicates logs by default",
        r"^(\([^)]*pid=\d+\) )?\[repeated \d+x across cluster\]",
        # Flower's simulation hints and its actors' shutdown
        r"Since flwr 1\.32, default simulated SuperNodes changed",
        r"To change federation size, use the following command",
        r"flwr federation simulation-config ",
        r"Manually terminating ClientAppActor",
        # Flower's strategies' own per-phase lines, which the progress line of each round repeats
        r"(configure_train|configure_evaluate): Sampled \d+ nodes \(out of \d+\)$",
        r"(aggregate_train|aggregate_evaluate): Received \d+ results and \d+ failures$",
    )
)
"""Start-up, shutdown and repeated per-round lines (matched without colour codes)."""


def is_noise(line: str) -> bool:
    """Whether ``line`` (with or without ANSI colours and a trailing newline) is :data:`NOISE`."""
    plain = ANSI.sub("", line).rstrip("\n")
    return any(pattern.search(plain) for pattern in NOISE)


class NoiseFilter:
    """Passes on the lines of a stream that are not noise, and counts both."""

    def __init__(self) -> None:
        self.shown = 0
        self.hidden = 0

    def lines(self, stream: Iterable[str]) -> Iterator[str]:
        """The lines of ``stream`` to show."""
        for line in stream:
            if is_noise(line):
                self.hidden += 1
            else:
                self.shown += 1
                yield line


def copy_filtered(
    source: IO[str],
    target: IO[str],
    noise_filter: NoiseFilter | None,
    seen: list[str],
    observe: Callable[[str], None] | None = None,
) -> None:
    """Copy ``source`` to ``target`` line by line (flushed), without the noise when ``noise_filter``
    is given; the shown lines that start the run's summary are appended to ``seen``; ``observe``
    (e.g. :meth:`fl_app.deploy.startup_timeline.StartupTimeline.observe`) sees every line, noise
    included, as it arrives."""
    lines: Iterable[str] = iter(source.readline, "")
    if observe is not None:
        lines = _observed(lines, observe)
    if noise_filter is not None:
        lines = noise_filter.lines(lines)
    for line in lines:
        if SUMMARY_HEADING in line:
            seen.append(line)
        target.write(line)
        target.flush()


def _observed(lines: Iterable[str], observe: Callable[[str], None]) -> Iterator[str]:
    for line in lines:
        observe(line)
        yield line


SUMMARY_HEADING = "=== Summary "
"""How the ServerApp's summary starts in the log (``fl_app.server_app``): the launcher prints the
summary itself only when the stream did not show it."""
