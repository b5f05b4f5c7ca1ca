"""``python -m clips4.trainer ...`` = ``clips4 train ...`` (what torchrun launches)."""
import sys

from clips4.pipeline.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
