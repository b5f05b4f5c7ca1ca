"""``ray.executor: auto``: small runs and one-worker runs stay in this process; larger ones and clusters use Ray."""
from __future__ import annotations

from clips4.cli import main
from clips4.pipeline.runner import resolve_executor


def test_auto_picks_this_process_for_small_or_single_worker_runs_and_ray_otherwise():
    assert resolve_executor("auto", "local", 2, 10, 48) == "local"
    assert resolve_executor("auto", "local", 1, 10_000, 48) == "local"
    assert resolve_executor("auto", "local", 2, 48, 48) == "ray"
    assert resolve_executor("auto", "auto", 2, 3, 48) == "ray"  # a cluster is joined whatever the size
    assert resolve_executor("auto", "ray://head:10001", 1, 3, 48) == "ray"
    assert resolve_executor("ray", "local", 2, 1, 48) == "ray" and resolve_executor("local", "auto", 2, 99, 48) == "local"


def test_a_small_stage_run_with_the_default_executor_does_not_start_ray(tmp_path, image_folder, capsys):
    args = ["precompute", "segments", "--dataset", "folder", "--root", str(image_folder), "--cache", str(tmp_path / "c"),
            "--detector", "classical", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "executor auto: in this process (6 images" in " ".join(captured.err.split())
    import json

    doc = json.loads(captured.out.strip().splitlines()[-1])
    assert doc["processed"] == 6 and all("/" not in node for node in doc["per_node"])  # Ray nodes are host/<id>


def test_a_long_lived_instance_in_ray_address_is_joined_not_started(tmp_path, image_folder, monkeypatch, capsys):
    """RAY_ADDRESS names an instance started once (`ray start --head`): every command joins it (here: nobody
    listens there, so the run says it cannot join that address, exit 2) and auto fans out to it."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    assert resolve_executor("auto", "local", 2, 3, 48) == "ray"
    args = ["precompute", "segments", "--dataset", "folder", "--root", str(image_folder), "--cache", str(tmp_path / "c"),
            "--detector", "classical", "--set", "ray.connect_timeout_s=5"]
    assert main(args) == 2
    assert "127.0.0.1:9" in " ".join(capsys.readouterr().err.split())
