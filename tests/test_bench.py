"""`make bench` in smoke mode: every part runs end to end on a tiny image folder and fills the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image_folder

from bench.run import run


@pytest.mark.slow
def test_bench_smoke_run_fills_every_row(tmp_path: Path, capsys) -> None:
    write_image_folder(tmp_path / "images" / "train", {"a": 40, "b": 40, "c": 40})
    results = run(root=str(tmp_path / "images"), out=str(tmp_path / "bench"), val_size=20, test_size=20, smoke=True)
    printed = capsys.readouterr().out
    a, b, c, d = results["pipeline"], results["overhead"], results["recipe"], results["fast_cpu"]
    assert a["tutorial"] > 0 and a["ours"] > 0 and a["ours_fast"] > 0
    assert b["steps"] == 1 and b["plain"] > 0 and b["cifar_cli"] > 0
    # Both recipes were tested on the same 20 held-out images: accuracies are multiples of 1/20.
    assert all(abs(acc * 20 - round(acc * 20)) < 1e-4 for acc in (c["tutorial_acc"], c["ours_acc"]))
    assert c["tutorial_fit"] > 0 and c["ours_fit"] > 0
    assert d["epochs"] == 1 and 0 <= d["final_acc"] <= 1 and d["fit_time"] > 0
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["recipe"] == c and saved["machine"].startswith("cifar-cli benchmarks:")
    table = (tmp_path / "bench" / "results.txt").read_text()
    for row in ("a. data pipeline", "b. Lightning overhead", "c. tutorial recipe", "fast-cpu.yaml", "e. GPU"):
        assert row in table and row in printed


def test_bench_refuses_a_folder_without_train(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="has no train/ folder"):
        run(root=str(tmp_path), out=str(tmp_path / "bench"), smoke=True)
