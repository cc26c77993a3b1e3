"""Progress: plain lines in a log (a tenth at a time), rich bars on a terminal, the same
lines to listeners (the run log), Hugging Face's bars off inside a stage."""

from __future__ import annotations

import pytest

from longrecipe import progress
from longrecipe.progress import progress_bar, progress_lines


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)  # the loops below take no time

    def set_terminal(on: bool) -> None:
        monkeypatch.setattr(progress, "on_terminal", lambda: on)

    return set_terminal


def test_without_a_terminal_a_line_per_tenth_and_a_last_one(terminal, capsys):
    terminal(False)
    with progress_bar("train", unit="steps", total=150) as bar:
        for step in range(150):
            bar.advance(1)
            bar.note(f"loss {1 / (step + 1):.3f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith("train: 15/150 steps (10%)") and "steps/s" in lines[0]
    assert "| loss" in lines[0] and "s left" in lines[0]
    assert lines[-1].startswith("train: done: 150/150 steps (100%)")


def test_unknown_total_says_where_it_is_at_the_end_and_on_a_heartbeat(terminal, capsys, monkeypatch):
    terminal(False)
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with progress_bar("ingest", unit="docs") as bar:
        bar.advance(3)
        now[0] = progress.HEARTBEAT_S + 1
        bar.advance(2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"ingest: 5 docs in {progress.HEARTBEAT_S + 1:.0f} s, 0.1 docs/s",
                     f"ingest: done: 5 docs in {progress.HEARTBEAT_S + 1:.0f} s, 0.1 docs/s"]


def test_on_a_terminal_the_bar_draws_and_listeners_get_the_lines(terminal, capsys):
    terminal(True)
    heard: list[str] = []
    with progress_lines(heard.append), progress_bar("evaluate", unit="samples", total=20) as bar:
        for _ in range(20):
            bar.advance(1)
    assert len(heard) == 10 and heard[-1].startswith("evaluate: done: 20/20")
    assert "evaluate: done" not in capsys.readouterr().err  # the bar is the display
    heard.clear()
    with progress_bar("evaluate", unit="samples", total=20) as bar:
        bar.advance(20)
    assert heard == []  # listeners only inside their block


def test_a_stage_of_seconds_says_little(terminal, capsys, monkeypatch):
    terminal(False)
    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 2.0)
    with progress_bar("merge", unit="tensors", total=47) as bar:
        for _ in range(47):
            bar.advance(1)
    lines = capsys.readouterr().err.strip().splitlines()
    # only the last line: every tenth came less than MIN_INTERVAL_S after the start
    assert len(lines) == 1 and lines[0].startswith("merge: done: 47/47 tensors (100%)")


def test_listener_failure_never_fails_a_stage_and_off_means_silent(terminal, capsys):
    terminal(False)

    def broken(_line):
        raise RuntimeError("log sink down")

    with progress_lines(broken), progress_bar("build", total=4) as bar:
        bar.advance(4)
    assert "build: done" in capsys.readouterr().err
    with progress_bar("build", enabled=False, total=4) as bar:
        bar.advance(4)
    assert capsys.readouterr().err == ""


def test_hugging_face_bars_are_off_inside_a_bar(terminal):
    from transformers.utils import logging as hf_logging

    terminal(False)
    hf_logging.enable_progress_bar()
    with progress_bar("evaluate", total=1) as bar:
        assert not hf_logging.is_progress_bar_enabled()
        bar.advance(1)
    assert hf_logging.is_progress_bar_enabled()
