"""Start-up time of the CLI: `clips4 --help` and `clips4 cache ls` (target < 1.5 s each on a 2-core machine), and
whether importing the CLI pulls in torch (it must not). Prints the median of a few runs."""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLIPS4 = Path(sys.executable).with_name("clips4")


def timed(cmd: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        rows = [("clips4 --help", timed([str(CLIPS4), "--help"])),
                ("clips4 cache ls (empty cache)", timed([str(CLIPS4), "cache", "ls", "--cache", d]))]
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import clips4.cli.app"], capture_output=True,
                         text=True).stderr
    heavy = sorted({ln.split("|")[-1].strip().split(".")[0] for ln in imp.splitlines()
                    if ln.split("|")[-1].strip().split(".")[0] in ("torch", "ray", "torchvision", "open_clip", "faiss")})
    print(f"{'command':<32} {'median s':>9}  target")
    for name, t in rows:
        print(f"{name:<32} {t:>9.2f}  < 1.5 {'ok' if t < 1.5 else 'MISSED'}")
    print(f"heavy modules imported by `import clips4.cli.app`: {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
