"""The guard of a private Ray instance (clips4.pipeline.rayguard), without Ray: when the process that started the
instance is killed, every process writing into the instance's session directory or naming it on its command line is
stopped, renamed or orphaned; a reader of its logs and unrelated processes are left alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the guard reads /proc (Linux)")

# a stand-in for a Ray helper: opens a log in the session directory for writing, forgets its command line's
# argument (as a renamed process shows no path), then waits
WRITER = """
import sys, time
f = open(sys.argv[1], "a")
sys.argv[1:] = []
print("ready", flush=True)
time.sleep(120)
"""
READER = """
import sys, time
f = open(sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""
# the driver: starts a child naming the session directory and writing its log there (the raylet), a guard, then
# reports their pids and waits
DRIVER = """
import subprocess, sys, time
from clips4.pipeline import rayguard
session = sys.argv[1]
head = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1] + '/logs/head.out', 'a'); "
                         "time.sleep(120)", session])
while not rayguard.started_here(session):
    time.sleep(0.05)
guard = rayguard.start(session)
print(head.pid, guard.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _ready(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_killed_driver_takes_the_instance_processes_with_it_and_nothing_else(tmp_path):
    session = tmp_path / "ray" / "session_x"
    (session / "logs").mkdir(parents=True)
    log = session / "logs" / "agent.log"
    log.write_text("")
    # the stand-in helper runs in a session of its own, as an orphaned Ray helper ends up: not the driver's child
    writer = _ready([sys.executable, "-c", WRITER, str(log)], start_new_session=True)
    reader = _ready([sys.executable, "-c", READER, str(log)])  # `tail -f` on a log
    other = _ready([sys.executable, "-c", WRITER, str(tmp_path / "elsewhere.log")])
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(session)], stdout=subprocess.PIPE, text=True)
    try:
        head, guard = map(int, driver.stdout.readline().split())
        time.sleep(0.3)
        assert all(_alive(p) for p in (writer.pid, reader.pid, other.pid, head, guard)), "nothing ends while it runs"
        driver.kill()
        driver.wait()
        deadline = time.time() + 15
        while time.time() < deadline and (_alive(writer.pid) or _alive(head) or _alive(guard)):
            time.sleep(0.1)
            writer.poll()
        assert not _alive(writer.pid) and not _alive(head) and not _alive(guard)
        assert reader.poll() is None and other.poll() is None
    finally:
        for p in (writer, reader, other, driver):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_guard_for_an_instance_this_process_did_not_start_is_not_started(tmp_path):
    from clips4.pipeline import rayguard

    session = tmp_path / "session_y"
    session.mkdir()
    assert not rayguard.started_here(str(session))
    assert rayguard.start(str(session)) is None
    assert rayguard.start(None) is None
