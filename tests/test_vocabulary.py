"""The repository speaks about the software only: names of configurations, comments and docs say what things are,
never when or by whom they were made (the categories are in PATTERNS). Every tracked text file is scanned; a hit
is reported as file:line."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: (pattern, what it is). Case-insensitive. A reference into another project (``apache/arrow#34314``) is fine:
#: only a bare ``#12`` in parentheses is a number of this project's tracker.
PATTERNS: list[tuple[str, str]] = [
    (r"(?<![.\w])stops?[- ]?\d+\b", "a label of a work step"),
    (r"\bsteps? ?#\d+", "a label of a work step"),
    (r"\b(?:pre|post)-(?:issue|stop)\b", "a label of a work step"),
    (r"\bissues?[- ]?#?\d+", "an issue number"),
    (r"\bdefects?[- ]?#?\d+", "a defect number"),
    (r"\bbugs? #\d+", "a defect number"),
    (r"\((?:see )?#\d+\)", "an issue number"),
    (r"\b(?:lent|leased?|leases|on loan)\b(?! ?=)", "a machine loan"),
    (r"\breviewers?\b", "a reviewer"),
    (r"\b(?:minutes|hours|seconds) of (?:GPU|device|machine) time\b", "the time a machine was available"),
    (r"\b(?:previous|earlier|next|later|last|several|three|two|work|coding) sessions?\b", "a work session"),
    (r"\b(?:the )?(?:old|previous|earlier|former|new) defaults\b", "defaults named by when they were chosen"),
    (r"\bprevious (?:card|shipped model|round)\b", "an earlier state of the project"),
]
_RX = [(re.compile(p, re.IGNORECASE), what) for p, what in PATTERNS]
#: this file states the patterns and their examples
SELF = Path(__file__).resolve().relative_to(REPO).as_posix()


def findings(text: str) -> list[tuple[int, str, str]]:
    """(line number, matched words, what they are) for every hit in ``text``."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for rx, what in _RX:
            m = rx.search(line)
            if m:
                hits.append((n, m.group(0), what))
    return hits


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.decode().split("\0"):
        if not name or name == SELF:
            continue
        p = REPO / name
        if not p.is_file() or p.is_symlink():
            continue
        head = p.read_bytes()[:8192]
        if b"\0" in head:  # binary (ONNX, images, Zarr parts)
            continue
        files.append(p)
    return files


#: one phrase per pattern category: the patterns go by the shape of the words, whatever a phrase is about (this
#: file is the only one the scan skips)
@pytest.mark.parametrize("sample", [
    "bus stop-24", "stop 25 of the tram line", "stops 24-25 of the route", "STOP24 on a keypad",
    "a magazine (issue 12)", "wafer defect 8", "pre-issue checks of a bond", "a pull request (#12)",
    "the book was lent", "minutes of GPU time per epoch", "a film reviewer", "three sessions of a conference",
    "the old defaults of a dialog box", "the previous card in the deck",
])
def test_the_patterns_catch_development_words(sample):
    assert findings(sample), sample


@pytest.mark.parametrize("sample", [
    "a rerun stops after the first stage", "apache/arrow#34314", "pytest's session fixtures",
    "ort.InferenceSession(path)", "AWS_SESSION_TOKEN", "the release of the lock", "iterations start..stop-1",
    "hard targets, raise calibration", "the defaults: soft targets at 30", "a stage's code version",
    "an equivalent image", "the issue of calibration", "step 250 / 500 / 1000",
])
def test_the_patterns_leave_ordinary_words(sample):
    assert not findings(sample), (sample, findings(sample))


def test_no_development_words_in_the_repository():
    bad = []
    for p in tracked_text_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, words, what in findings(text):
            bad.append(f"{p.relative_to(REPO).as_posix()}:{n}: {words!r} ({what})")
    assert not bad, "words about how the project was developed, not what it does:\n" + "\n".join(bad)
