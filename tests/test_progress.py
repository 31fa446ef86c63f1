"""What a user sees while a run works (reweight.core.progress): log lines that never run into a
progress bar, the heartbeat with the ETA without a terminal, and the end-of-run phases of the
real CLI logged with their durations when nothing is a terminal."""

from __future__ import annotations

import io
import itertools
import logging
import re
import subprocess
import sys

from tqdm import tqdm

from reweight.core.progress import Heartbeat, TqdmHandler, format_duration

from .helpers import cli_env


def _segments(text: str) -> list[str]:
    """What a terminal shows line by line: the text cut at every carriage return and newline."""
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def _log_during_a_bar(handler: logging.Handler, stream: io.StringIO) -> list[str]:
    log = logging.getLogger("test_progress.bar")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with tqdm(total=10, file=stream, desc="train", ascii=True) as bar:
            bar.update(3)
            bar.refresh()
            log.info("step 3: train_loss=0.5")
            bar.update(7)
    finally:
        log.removeHandler(handler)
    return _segments(stream.getvalue())


def test_a_log_line_takes_its_own_line_beside_a_bar():
    stream = io.StringIO()
    shown = _log_during_a_bar(TqdmHandler(stream), stream)
    assert "step 3: train_loss=0.5" in shown  # a line of its own, the bar cleared before it
    after = shown[shown.index("step 3: train_loss=0.5") + 1 :]
    assert after and after[0].startswith("train:")  # and the bar drawn again below it


def test_a_plain_stream_handler_runs_into_the_bar():
    """What the console handler did before: the line glued to the bar's text."""
    stream = io.StringIO()
    shown = _log_during_a_bar(logging.StreamHandler(stream), stream)
    assert "step 3: train_loss=0.5" not in shown
    assert any(s.startswith("train:") and s.endswith("step 3: train_loss=0.5") for s in shown)


def test_heartbeat_comes_after_three_seconds_then_at_doubling_intervals(caplog):
    times = iter([0.0, *[0.5 * k for k in range(1, 700)]])  # one step every 0.5 s
    beat = Heartbeat(logging.getLogger("test_progress"), total=1000, clock=times.__next__)
    with caplog.at_level(logging.INFO, logger="test_progress"):
        lines = {step: beat.tick(step) for step in range(1, 700)}
    beats = [step for step, line in lines.items() if line]
    assert beats[:5] == [6, 18, 42, 90, 186]  # at 3 s, then 6, 12, 24, 48 s later...
    assert [b - a for a, b in itertools.pairwise(beats[4:])] == [120] * 4  # 60 s
    assert lines[6] == "step 6/1000 (1%), 0.5 s/step, ETA 8 min 17 s"
    assert caplog.messages == [lines[b] for b in beats]


def test_format_duration():
    assert [format_duration(s) for s in (2.34, 42, 185, 16560)] == [
        "2.3 s",
        "42 s",
        "3 min 5 s",
        "4 h 36 min",
    ]


def test_the_end_of_a_run_is_logged_with_durations_without_a_terminal(tmp_path, data_root):
    """The real CLI, stdout and stderr to files: each phase after the last step says when it
    starts and how long it took, in the console and in train.log; no bar is drawn."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    run_dir = tmp_path / "run"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "reweight", "dataset=mnist_noisy", "dataset.train_per_class=20",
             "model=mlp", "trainer.max_steps=3", "trainer.batch_size=20",
             f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=cli_env(), stdout=stdout, stderr=stderr, timeout=600,
        )  # fmt: skip
    assert proc.returncode == 0, err.read_text()
    for text in (out.read_text(), (run_dir / "train.log").read_text()):
        messages = [line.split(" - ", 1)[1] for line in text.splitlines() if " - " in line]
        last_step = max(i for i, m in enumerate(messages) if m.startswith("step 3:"))
        done = next(i for i, m in enumerate(messages) if m.startswith("done:"))
        end = messages[last_step + 1 : done]
        duration = r"\d+(\.\d)? s|\d+ min \d+ s"
        expected = [
            r"final evaluation: val and test \.\.\.",
            rf"final evaluation: ({duration})",
            r"final weights: 200 examples, 1 pass\(es\) \.\.\.",
            rf"final weights: ({duration})",
            r"suspects\.csv: scoring 200 training examples \.\.\.",
            rf"suspects\.csv: ({duration})",
            r"plots: learning_curves\.png, weight_histogram\.png \.\.\.",
            rf"plots: ({duration})",
        ]
        assert len(end) == len(expected), end
        for message, pattern in zip(end, expected, strict=True):
            assert re.fullmatch(pattern, message), (message, pattern)
    assert "it/s" not in err.read_text()  # no bar without a terminal
