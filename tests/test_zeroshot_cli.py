"""``atprune eval`` and ``atprune prune --zero-shot``: one-line errors (exit 2) before loading, and small runs on a
tiny model folder with a hand-made PIQA-format task."""

from __future__ import annotations

import json

import pytest

import atprune.models.sources
from atprune.cli import main
from tests.conftest import random_text, save_tiny_model

import lm_eval  # noqa: F401,E402  (a hard dependency: a broken install fails here, it does not skip)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    save_tiny_model(root / "model", layers=2, seed=1)
    data = root / "data" / "piqa"
    data.mkdir(parents=True)
    rows = [{"goal": f"goal {i}", "sol1": "do it " * (i % 3 + 1), "sol2": f"other {i}"} for i in range(5)]
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid-labels.lst").write_text("0\n1\n0\n1\n1\n")
    (root / "calib.txt").write_text(random_text(3000, seed=1))
    return root


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,squad"], "unknown zero-shot task 'squad'"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["--tasks", "boolq", "--task-data", "{root}/data"], "dev.jsonl not found in"),
    (["--tasks", "piqa"], "give --task-data DIR"),  # conftest sets HF_DATASETS_OFFLINE=1
])
def test_eval_bad_input_exit_2_before_loading(files, argv, message, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("model loaded before the options were checked")

    monkeypatch.setattr(atprune.models.sources, "load_model", no_load)
    argv = [a.format(root=files) for a in argv]
    assert main(["eval", "--model", str(files / "model"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atprune: error:") and message in err and "\n" not in err


def test_prune_zero_shot_bad_input_exit_2(files, capsys):
    assert main(["prune", "--model", str(files / "model"), "--calib-data", str(files / "calib.txt"), "--no-eval",
                 "--zero-shot", "piqa", "--task-data", str(files / "data"), "--zero-shot-limit", "-1"]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err


def test_eval_cli_writes_json(files, capsys):
    out = files / "eval_out"
    assert main(["eval", "--model", str(files / "model"), "--tasks", "piqa", "--task-data", str(files / "data"),
                 "--limit", "4", "--batch-size", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "zeroshot.json").read_text())
    assert result["tasks"]["piqa"]["n"] == 4 and result["tasks"]["piqa"]["requests"] == 8
    assert result["limit"] == 4 and result["model"]["source"] == "folder"
    assert "piqa" in printed and "requests" in printed


def test_prune_zero_shot_in_report(files, capsys):
    out = files / "pruned"
    assert main(["prune", "--model", str(files / "model"), "--sparsity", "0.5", "--calib-data", str(files / "calib.txt"),
                 "--nsamples", "2", "--seqlen", "32", "--no-eval", "--zero-shot", "piqa", "--task-data",
                 str(files / "data"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    zs = report["zero_shot"]
    assert zs["dense"]["tasks"]["piqa"]["n"] == zs["sparse"]["tasks"]["piqa"]["n"] == 5
    assert set(zs["gate"]) >= {"flagged", "reason", "acc_drop"}
    assert zs["gate"]["acc_drop"]["piqa"] == pytest.approx(zs["dense"]["tasks"]["piqa"]["acc"] - zs["sparse"]["tasks"]["piqa"]["acc"])
    assert "sparse acc" in capsys.readouterr().out
    # the pruned run folder evaluates through `atprune eval` and says what it is
    assert main(["eval", "--model", str(out), "--tasks", "piqa", "--task-data", str(files / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["pruning"]["overall_sparsity"] == pytest.approx(report["pruning"]["overall_sparsity"])
    assert result["tasks"]["piqa"]["acc"] == pytest.approx(zs["sparse"]["tasks"]["piqa"]["acc"])


def test_search_zero_shot(files, capsys):
    out = files / "searched"
    evalf = files / "eval.txt"
    evalf.write_text(random_text(400, seed=2))
    assert main(["search", "--model", str(files / "model"), "--method", "magnitude", "--sparsity", "0.5",
                 "--calib-data", str(files / "calib.txt"), "--eval-data", str(evalf), "--nsamples", "2", "--nselect", "2",
                 "--seqlen", "32", "--strategy", "grid", "--step", "0.2", "--out", str(out), "--quiet",
                 "--zero-shot", "piqa", "--task-data", str(files / "data"), "--zero-shot-limit", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    zs = report["zero_shot"]
    assert zs["dense"]["tasks"]["piqa"]["n"] == zs["sparse"]["tasks"]["piqa"]["n"] == 3
    assert json.loads((out / "search.json").read_text())["zero_shot"]["gate"] == zs["gate"]
    assert "sparse acc" in capsys.readouterr().out
    # the saved model is the final one: `atprune eval` on the folder gives the same accuracy
    assert main(["eval", "--model", str(out), "--tasks", "piqa", "--task-data", str(files / "data"), "--limit", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["piqa"]["acc"] == zs["sparse"]["tasks"]["piqa"]["acc"]
