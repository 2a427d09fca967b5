"""`peft-umema reproduce` end to end on a tiny random BERT and tiny slices of SemEval-2010 Task 8 and WNUT-2017:
cells written, a rerun skips them, a killed cell is redone, the report rebuilds the tables from the folders alone."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import PNG_SIGNATURE, save_relation_slice, save_tiny_backbone
from test_methods import save_wnut17_slice

from peft_umema import UMEMAConfig
from peft_umema.cli import main
from peft_umema.experiments import reproduce as rp
from peft_umema.experiments import runs
from peft_umema.experiments.verdict import umema_verdict

TRAINING = ["--shots", "16", "--max-steps", "2", "--epochs", "1", "--batch-size", "8", "--max-length", "32",
            "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="module")
def relations(shared_data, tmp_path_factory) -> str:
    return str(save_relation_slice(shared_data, tmp_path_factory.mktemp("semeval"), train_records=80, test_records=24))


@pytest.fixture(scope="module")
def tweets(shared_data, tmp_path_factory) -> str:
    return str(save_wnut17_slice(shared_data, tmp_path_factory.mktemp("wnut17"), sentences=40))


def grid_command(backbone, datasets, output_dir, *extra):
    return ["reproduce", "--backbone", backbone, "--datasets", *datasets, "--output-dir", str(output_dir),
            *TRAINING, *extra]


def finished_cells(output_dir: Path) -> dict[str, float]:
    """key -> mtime of cell.json, for every finished cell."""
    return {
        str(path.parent.relative_to(output_dir / rp.CELLS_DIR)): path.stat().st_mtime_ns
        for path in (output_dir / rp.CELLS_DIR).glob(f"**/{rp.CELL_NAME}")
    }


ABLATION_AND_CALIBRATION = ("--study", "ablation", "calibration", "--methods", "lora", "umema", "--seeds", "0", "1",
                            "--tune-lrs", "1e-3", "5e-3")


@pytest.fixture(scope="module")
def grid_run(tiny_backbone, relations, tweets, tmp_path_factory):
    """Ablation + calibration (LoRA and UMEMA) on both slices, two seeds, the learning rate tuned on dev."""
    output_dir = tmp_path_factory.mktemp("reproduce") / "grid"
    command = grid_command(tiny_backbone, [relations, tweets], output_dir, *ABLATION_AND_CALIBRATION, "--jobs", "1")
    assert main(command) == 0
    return command, output_dir


# ------------------------------------------------------------------------------------------------------------------
# Plans (no training)
# ------------------------------------------------------------------------------------------------------------------


def test_default_plan_follows_the_paper():
    grid = rp.Grid()
    assert list(grid.datasets) == ["20newsgroups", "semeval2010_task8", "wnut17", "ploner"]
    assert list(grid.shots) == [200, 500, 1000] and list(grid.seeds) == [0, 1, 2]
    def lr(backbone, data):
        return 1e-3

    counts = {study: len(rp.study_cells(study, grid, lr)) for study in rp.STUDIES}
    assert counts["ablation"] == 4 * 3 * 3 * 4
    assert counts["lr"] == 4 * 3 * 3 * 2 * 5
    assert counts["missing"] == 4 * 3 * 3 * 2 * 6
    assert counts["calibration"] == 4 * 1 * 3 * 8
    assert counts["overhead"] == 4 * 1 * 3 * 4
    ablation = rp.study_cells("ablation", grid, lr)
    assert {cell.variant for cell in ablation} == {"lora", "+um", "+ema", "umema"}
    assert {(cell.method, cell.flags.get("use_um"), cell.flags.get("use_ema")) for cell in ablation} == {
        ("lora", True, True), ("umema", True, False), ("umema", False, True), ("umema", True, True)}
    assert {cell.learning_rate for cell in rp.study_cells("lr", grid, lr)} == {5e-5, 1e-4, 2e-4, 5e-4, 1e-3}
    assert {cell.missing_rate for cell in rp.study_cells("missing", grid, lr)} == {0, 0.1, 0.2, 0.3, 0.4, 0.5}
    calibration = rp.study_cells("calibration", grid, lr)
    assert {cell.shots for cell in calibration} == {1000}
    assert {"lora", "lora+ts", "mcdropout", "ensemble", "swag", "laplace", "adue", "umema"} == {
        cell.variant for cell in calibration}
    assert all(cell.settings.epochs == 1 for cell in rp.study_cells("overhead", grid, lr))

    # shared cells run once; the most informative come first: 1000 shots, seed 0, the ablation
    by_study = {study: rp.study_cells(study, grid, lr) for study in rp.STUDIES if study != "overhead"}
    cells = rp.ordered(by_study, grid)
    assert len(cells) == len(set().union(*map(set, by_study.values())))
    assert len(cells) < sum(map(len, by_study.values()))
    assert (cells[0].shots, cells[0].seed, cells[0].variant) == (1000, 0, "lora")
    assert [cell.variant for cell in cells[:4]] == ["lora", "+um", "+ema", "umema"]
    assert cells[-1].shots == 200 and cells[-1].seed == 2
    assert len({cell.key for cell in cells}) == len(cells)  # one folder per cell


def test_without_a_learning_rate_only_lr_cells_are_planned_until_tuning():
    grid = rp.Grid(datasets=["wnut17"], shots=[1000], seeds=[0])
    tuning = rp.tune_cells(grid)
    assert [(cell.variant, cell.shots, cell.seed) for cell in tuning] == [("lora", 1000, 0)] * 5
    assert rp.study_cells("ablation", grid, lambda backbone, data: None) == []
    assert len(rp.study_cells("lr", grid, lambda backbone, data: None)) == 2 * 5


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_backbone, relations, tmp_path, capsys):
    output_dir = tmp_path / "dry"
    command = grid_command(tiny_backbone, [relations], output_dir, "--study", "all", "--seeds", "0", "1", "--lr",
                           "5e-3", "--dry-run")
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "Plan:" in printed and "ablation: 8 cells (8 to run)" in printed
    assert "overhead: 8 cells" in printed and "calibration: 16 cells" in printed
    assert not (output_dir / rp.CELLS_DIR).exists()
    # tuning too: a dry run plans at seed 0 whatever --seeds says, and leaves no plan behind that would hold up
    # the choice of learning rate until its cells ran
    tuned = grid_command(tiny_backbone, [relations], output_dir, "--study", "ablation", "--seeds", "1", "2",
                         "--dry-run")
    assert main(tuned) == 0
    assert "tune: 5 cells: lora at lr 0.0002, 0.0005, 0.001, 0.002, 0.005, 16 shots, seed 0;" in capsys.readouterr().out
    assert not rp._plan_path(output_dir, rp.TUNE).exists()


def test_bad_arguments_fail_before_training(tiny_backbone, relations, tmp_path, capsys):
    base = grid_command(tiny_backbone, [relations], tmp_path / "bad", "--study", "ablation", "--lr", "1e-3")
    assert main(base + ["--methods", "nonsense"]) == 2
    assert "Unknown method(s) ['nonsense']" in capsys.readouterr().err
    assert main(base + ["--seeds", "0", "0"]) == 2
    assert not (tmp_path / "bad" / rp.CELLS_DIR).exists()


@pytest.mark.parametrize("option, value, message", [
    ("--epochs", "0", "--epochs 0.0: must be a finite number > 0"),
    ("--epochs", "nan", "--epochs nan: must be a finite number > 0"),
    ("--patience", "0", "--patience 0: must be an integer >= 1"),
    ("--batch-size", "-4", "--batch-size -4: must be an integer >= 1"),
    ("--max-length", "0", "--max-length 0: must be an integer >= 1"),
    ("--rank", "0", "--rank 0: must be an integer >= 1"),
    ("--max-steps", "0", "--max-steps 0: must be an integer >= 1 or -1"),
    ("--seeds", "-1", "--seeds -1: must be an integer between 0"),
    ("--lr", "0", "--lr 0.0: the learning rate must be a finite number > 0"),
    ("--tune-lrs", "5", "--tune-lrs 5.0: learning rates above 1 make training diverge"),
    ("--learning-rates", "inf", "--learning-rates inf: the learning rate must be a finite number > 0"),
    ("--overhead-epochs", "0", "--overhead-epochs 0.0: must be a finite number > 0"),
    ("--threads", "0", "--threads must be at least 1"),
    ("--dev-size", "0", "--dev-size must be a positive number of examples"),
])
def test_each_bad_option_value_is_one_line_before_any_cell(option, value, message, tmp_path, capsys):
    """Checked when the invocation starts: a bad value would otherwise fail in every cell, one by one."""
    assert main(["reproduce", "--datasets", "ploner", "--output-dir", str(tmp_path / "bad"), option, value]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------------------------
# Running, resuming, reporting
# ------------------------------------------------------------------------------------------------------------------


def test_every_cell_is_a_finished_run_folder(grid_run):
    _, output_dir = grid_run
    records = rp.all_records(output_dir)
    tune = rp.read_plan(output_dir, rp.TUNE)["cells"]
    ablation = rp.read_plan(output_dir, "ablation")["cells"]
    calibration = rp.read_plan(output_dir, "calibration")["cells"]
    assert len(tune) == 2 * 2 and len(ablation) == 2 * 2 * 2
    assert set(calibration) == set(ablation)  # shared cells: one folder, listed by both studies
    assert set(records) == set(tune) | set(ablation)
    for key, record in records.items():
        folder = output_dir / rp.CELLS_DIR / key
        assert record["key"] == key and record["cell"]["settings"]["max_steps"] == 2
        assert record["sizes"]["train"] == 16
        assert record["task_type"] in ("SEQ_CLS", "TOKEN_CLS")
        assert record["trainable_parameters"] > 0 and record["timings"]["wall_seconds"] > 0
        assert record["memory"]["peak_bytes"] > 0
        assert (folder / rp.PREDICTIONS_NAME).is_file() and (folder / rp.LOG_NAME).is_file()
        assert not (folder / rp.LOCK_NAME).exists()
        kept = list((folder / rp.RUN_DIR).glob("*.safetensors"))
        # without --keep-adapters only the lora cells keep theirs (the post-hoc baselines start from them)
        assert bool(kept) == (record["cell"]["variant"] in rp.BASE_VARIANTS)
    # the full test splits of the slices are scored
    sizes = {record["task_type"]: record["sizes"]["test"] for record in records.values()}
    assert sizes == {"SEQ_CLS": 24, "TOKEN_CLS": 40}

    # every study cell uses the learning rate LoRA scored best with on dev
    selection = rp.select_learning_rates(records[key] for key in tune)
    assert len(selection) == 2
    for key in ablation:
        cell = records[key]["cell"]
        picked = next(value for (backbone, data, *_), value in selection.items() if data == cell["data"])
        assert cell["learning_rate"] == picked["learning_rate"]


def test_rerun_skips_finished_cells(grid_run, capsys):
    command, output_dir = grid_run
    before = finished_cells(output_dir)
    assert main(command) == 0
    assert "0 cells run" in capsys.readouterr().out
    assert finished_cells(output_dir) == before


def test_a_cell_without_cell_json_is_redone(grid_run, capsys):
    command, output_dir = grid_run
    before = finished_cells(output_dir)
    victim = sorted(before)[1]
    folder = output_dir / rp.CELLS_DIR / victim
    (folder / rp.CELL_NAME).unlink()  # as if killed before the end
    (folder / "half-written.bin").write_bytes(b"junk")
    (folder / rp.LOCK_NAME).write_text("999999999 12345")  # its process is gone
    assert main([*command[:-2], "--jobs", "1"]) == 0
    assert "1 cells run" in capsys.readouterr().out
    after = finished_cells(output_dir)
    assert set(after) == set(before)
    assert after[victim] != before[victim]
    assert {key: mtime for key, mtime in after.items() if key != victim} == {
        key: mtime for key, mtime in before.items() if key != victim}
    assert not (folder / "half-written.bin").exists()


def test_report_rebuilds_tables_and_figures_from_the_folders_alone(grid_run, tiny_backbone, tmp_path):
    _, output_dir = grid_run
    moved = tmp_path / "copied-results"
    shutil.copytree(output_dir, moved)  # no report, no data, nothing but the run folders
    shutil.rmtree(moved / "report")
    report_dir, protocol_dir = tmp_path / "docs", tmp_path / "docs" / "protocol"
    assert main(["reproduce", "--report", "--output-dir", str(moved), "--report-dir", str(report_dir),
                 "--protocol-dir", str(protocol_dir)]) == 0

    markdown = (report_dir / "results.md").read_text()
    for title in ("## Learning rate chosen on dev", "## Ablation (`ablation`)", "## Calibration"):
        assert title in markdown
    assert "Accuracy / ECE" in markdown and "Span F1 / ECE" in markdown
    assert "## At a glance" not in markdown  # no LoRA + TS cell to weigh UMEMA against, so no summary
    ablation = markdown.split("## Ablation")[1].split("## Calibration")[0]
    score_table, *per_data = ablation.split("test (mean ± std over seeds; error AUROC of the method's own")
    rows = [line for line in score_table.splitlines() if line.startswith(("| LoRA", "| UMEMA"))]
    assert len(rows) == 2 and all(line.count(" ± ") == 4 for line in rows)
    assert len(per_data) == 2  # one block per data set: test calibration, then training per epoch
    for block in per_data:
        test_table, epochs_table = block.split("Training per epoch, seed 0")
        assert "NLL ↓" in test_table and "Error AUROC ↑" in test_table
        epoch_rows = [line.split(" | ") for line in epochs_table.splitlines() if line.startswith(("| LoRA", "| UMEMA"))]
        assert {row[0] for row in epoch_rows} == {"| LoRA", "| UMEMA"}
        for row in epoch_rows:  # UM's training temperature exists for UMEMA only, and never sits at its floor
            assert (row[2] == "–") == (row[0] == "| LoRA")
            assert row[0] == "| LoRA" or float(row[2]) > UMEMAConfig.min_temperature
    assert "peft-umema reproduce --study ablation calibration" in markdown  # the exact command
    assert "wall" in markdown
    (hardware,) = [line for line in markdown.splitlines() if line.startswith("Where the cells ran: ")]
    machine = (f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available()
               else f"CPU only ({os.cpu_count()} cores, no accelerator)")
    assert hardware == f"Where the cells ran: {tiny_backbone}: {len(rp.all_records(moved))} cells on {machine}."

    for study in ("tune", "ablation", "calibration"):
        document = json.loads((protocol_dir / f"{study}.json").read_text())
        assert document["complete"] and document["finished_cells"] == document["planned_cells"] > 0
        assert document["invocations"][0]["command"].startswith("peft-umema reproduce")
        assert all(cell["status"] == "finished" and "ece" in cell["test"] for cell in document["cells"])
    ablation_document = json.loads((protocol_dir / "ablation.json").read_text())
    assert {(row["variant"], row["score"]["n"]) for row in ablation_document["summary"]} == {("lora", 2), ("umema", 2)}
    # The paper's grid next to what ran: 2 data sets x shots {16, 200, 500, 1000} x seeds 0-2 x the 4 variants;
    # finished: shots 16, seeds 0-1, LoRA and UMEMA on both data sets.
    (coverage,) = ablation_document["paper_grid"].values()
    assert (coverage["planned"], coverage["finished"]) == (2 * 4 * 3 * 4, 2 * 2 * 2)
    assert all(row == {"16": 4, "200": 0, "500": 0, "1000": 0} for row in coverage["finished_per_data_and_shots"].values())
    assert "8 of 96 cells finished" in ablation

    figures = sorted(path.name for path in (report_dir / "figures").glob("*.png"))
    assert any(name.endswith("_overlay.png") for name in figures)
    assert sum(name.startswith("reliability_") and not name.endswith("_overlay.png") for name in figures) == 4
    for name in figures:
        assert (report_dir / "figures" / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"figures/{name}" in markdown


def test_main_study_reuses_the_ablation_cells_and_says_what_stands_for_split_and_federated_lora(
        grid_run, tiny_backbone, relations, tweets, tmp_path):
    _, grid_dir = grid_run
    output_dir = tmp_path / "grid"
    shutil.copytree(grid_dir, output_dir)
    before = finished_cells(output_dir)
    assert main(grid_command(tiny_backbone, [relations, tweets], output_dir, "--study", "main", "--methods", "lora",
                             "umema", "--seeds", "0", "1", "--tune-lrs", "1e-3", "5e-3")) == 0
    assert finished_cells(output_dir) == before  # LoRA and UMEMA main cells are the ablation's cells
    main_section = (output_dir / "report" / "results.md").read_text().split("## Main results (`main`)")[1]
    assert "SplitLoRA" in main_section.split("\n## ")[0] and "LoRA row stands for them" in main_section


def test_grid_coverage_counts_at_the_learning_rate_most_cells_use():
    """An invocation with another --lr adds a few cells; coverage still counts the grid at the rate most cells use."""
    settings = rp.TrainingSettings()
    cells = [rp.Cell("train", "minilm", "ploner", 1000, seed, "lora", 2e-3, 0.0, settings) for seed in (0, 1, 2)]
    cells.append(rp.Cell("train", "minilm", "ploner", 1000, 0, "umema", 1e-3, 0.0, settings))  # planned last
    view = rp.StudyView("ablation", {"cells": {cell.key: cell.to_dict() for cell in cells}},
                        {cell.key: {} for cell in cells})
    (coverage,) = rp.paper_grid_coverage(view).values()
    assert coverage["finished_per_data_and_shots"]["ploner"][1000] == 3
    assert coverage["finished"] == 3 and coverage["planned"] == 4 * 3 * 3 * 4


def test_cells_whose_dev_score_never_moved_are_named_in_the_report():
    """A model that never changed its dev score (no spans found) is listed, so its zero is not read as the method's."""
    settings = rp.TrainingSettings()
    stuck, learnt, single = (rp.Cell("train", "minilm", "wnut17", 500, seed, "lora", 1e-3, 0.0, settings)
                             for seed in (0, 1, 2))
    def record(dev_scores, test_f1):
        return {"task_type": "TOKEN_CLS", "test": {"f1": test_f1}, "epochs_trained": float(len(dev_scores)),
                "log_history": [{"loss": 1.0, "epoch": 1.0}]
                + [{"eval_f1": score, "epoch": float(epoch)} for epoch, score in enumerate(dev_scores, 1)]}
    records = {stuck.key: record([0.0, 0.0, 0.0], 0.0), learnt.key: record([0.0, 0.1, 0.3], 0.31),
               single.key: record([0.2], 0.2)}  # one evaluation: nothing to say it never moved
    view = rp.StudyView("ablation", {"cells": {cell.key: cell.to_dict() for cell in (stuck, learnt, single)}},
                        records)
    (flat,) = rp.flat_dev_cells(view)
    assert flat["key"] == stuck.key and flat["evaluations"] == 3 and flat["test_score"] == 0.0
    text = rp._flat_dev_text(view)
    assert "Cells that never improved on dev** (1)" in text
    assert f"`{stuck.key}`: dev f1 0.000 at all 3 evaluations, 3 epochs trained; test 0.000" in text
    assert learnt.key not in text and single.key not in text
    del records[stuck.key]
    assert rp._flat_dev_text(view) == ""


def test_a_cell_log_shows_each_line_while_the_cell_runs(monkeypatch, tmp_path):
    """cell.log is written line by line: an hours-long cell's epoch lines can be followed (`tail -f`) as it runs."""
    seen = []

    def training_that_logs_an_epoch(*args, **kwargs):
        print("{'loss': 1.0, 'epoch': 1.0}")
        seen.append((folder / rp.LOG_NAME).read_text(encoding="utf-8"))
        raise RuntimeError("stopped after one epoch")

    monkeypatch.setattr(runs, "train", training_that_logs_an_epoch)
    cell = rp.Cell("train", "minilm", "ploner", 16, 0, "lora", 2e-3, 0.0, rp.TrainingSettings())
    folder = rp.cell_dir(tmp_path, cell)
    outcome = rp.run_cell(cell, tmp_path)
    assert outcome["status"] == "failed" and "stopped after one epoch" in outcome["error"]
    assert seen == ["{'loss': 1.0, 'epoch': 1.0}\n"]
    assert (folder / rp.ERROR_NAME).is_file() and rp.finished_record(folder) is None


def test_learning_rate_waits_for_every_tuning_rate_and_never_crosses_shot_counts(tmp_path):
    """One rate per backbone, data set and shot count, chosen only once each tuning cell has finished or failed: a
    rate still running elsewhere (or killed) might win, and a 200-shot dev score says nothing about 1000 shots."""
    settings = rp.TrainingSettings()
    lora_at = {(shots, lr): rp.Cell("train", "minilm", "ploner", shots, 0, "lora", lr, 0.0, settings)
               for shots in (200, 1000) for lr in (1e-3, 2e-3)}
    rp._add_to_plan(tmp_path, rp.TUNE, list(lora_at.values()), rp.Grid(datasets=("ploner",), shots=(200, 1000)))

    def record(cell, dev_f1):
        return {"cell": cell.to_dict(), "task_type": "TOKEN_CLS", "dev": {"f1": dev_f1}}

    def finish(cell, dev_f1):
        folder = rp.cell_dir(tmp_path, cell)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / rp.CELL_NAME).write_text(json.dumps({**record(cell, dev_f1), "key": cell.key}), encoding="utf-8")

    finish(lora_at[200, 1e-3], 0.70)
    finish(lora_at[1000, 1e-3], 0.86)
    finish(lora_at[1000, 2e-3], 0.88)
    waiting = rp.waiting_tuning_groups(tmp_path)
    records = [record(lora_at[200, 1e-3], 0.70), record(lora_at[1000, 1e-3], 0.86), record(lora_at[1000, 2e-3], 0.88)]
    selection = rp.select_learning_rates(records, waiting)
    group = ("minilm", "ploner", 200, rp._settings_key(settings))
    assert selection[group]["waiting"] and selection[group]["candidates"] == {1e-3: 0.70}
    at_1000 = selection[("minilm", "ploner", 1000, rp._settings_key(settings))]
    assert not at_1000["waiting"] and at_1000["learning_rate"] == 2e-3 and at_1000["candidates"] == {1e-3: 0.86, 2e-3: 0.88}
    # the missing 200-shot rate fails: the choice is made from what finished
    failed = rp.cell_dir(tmp_path, lora_at[200, 2e-3])
    failed.mkdir(parents=True)
    (failed / rp.ERROR_NAME).write_text("{}", encoding="utf-8")
    assert rp.waiting_tuning_groups(tmp_path) == set()
    assert rp.select_learning_rates(records)[group]["learning_rate"] == 1e-3


def test_one_seed_shows_its_value_without_a_spread():
    """A single seed has no sample std: the table shows the value alone, the JSON null, not a "± 0.000"."""
    one, two = rp._stats([0.8361]), rp._stats([0.80, 0.82, None])
    assert one == {"mean": 0.8361, "std": None, "n": 1}
    assert rp._cell_text(one) == "0.836"
    assert rp._cell_text(one, expected=3) == "0.836 (1/3)"
    assert two["n"] == 2 and rp._cell_text(two) == "0.810 ± 0.014"


def test_curves_and_a_second_invocation_in_the_same_folder(grid_run, tiny_backbone, relations):
    """lr and missing studies added later: shared cells are reused, curves drawn, plans merged."""
    _, output_dir = grid_run
    before = finished_cells(output_dir)
    assert main(grid_command(tiny_backbone, [relations], output_dir, "--study", "lr", "missing", "--methods", "lora",
                             "--seeds", "0", "--tune-lrs", "1e-3", "5e-3", "--learning-rates", "1e-3", "5e-3",
                             "--missing-rates", "0", "0.3")) == 0
    after = finished_cells(output_dir)
    assert len(set(after) - set(before)) == 1  # lr cells = tuning cells, missing rate 0 = the ablation's cell
    new = rp.all_records(output_dir)[next(iter(set(after) - set(before)))]
    assert new["cell"]["missing_rate"] == 0.3 and new["cell"]["variant"] == "lora"
    markdown = (output_dir / "report" / "results.md").read_text()
    assert "## Learning-rate sensitivity" in markdown and "## Missing-information robustness" in markdown
    assert (output_dir / "report" / "figures" / f"lr_{Path(tiny_backbone).name}_16shots.png").is_file()
    assert (output_dir / "report" / "figures" / f"missing_{Path(tiny_backbone).name}_16shots.png").is_file()
    # the earlier studies are still reported
    assert "## Ablation" in markdown
    invocations = json.loads((output_dir / "report" / "protocol" / "tune.json").read_text())["invocations"]
    assert invocations[0]["command"].startswith("peft-umema reproduce --study ablation calibration")
    assert invocations[-1]["command"].startswith("peft-umema reproduce --study lr missing")


def _table_row(markdown: str, first: str) -> list[str]:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {first} |")]
    assert len(rows) == 1, rows
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_overhead_cells_run_alone_in_fresh_processes(tiny_backbone, relations, tmp_path):
    output_dir = tmp_path / "overhead"
    assert main(grid_command(tiny_backbone, [relations], output_dir, "--study", "overhead", "--methods", "lora",
                             "umema", "--seeds", "0", "--lr", "5e-3")) == 0
    records = list(rp.all_records(output_dir).values())
    assert sorted(record["cell"]["variant"] for record in records) == ["lora", "umema"]
    for record in records:
        assert record["cell"]["kind"] == "overhead" and record["memory"]["fresh_process"] is True
        assert record["timings"]["train_seconds_per_epoch"] > 0
        load = record["machine_load"]
        assert load["cpus"] == os.cpu_count() and load["load_1min_at_start"] >= 0 and load["load_1min_at_end"] >= 0
    by_variant = {record["cell"]["variant"]: record for record in records}
    assert by_variant["umema"]["trainable_parameters"] > by_variant["lora"]["trainable_parameters"]
    markdown = (output_dir / "report" / "results.md").read_text()
    assert "Train s / epoch" in markdown and "Peak memory (MiB)" in markdown and "Machine load at end" in markdown
    shown_load = float(_table_row(markdown, "UMEMA")[-1])  # one seed: its value, to one decimal
    assert abs(shown_load - by_variant["umema"]["machine_load"]["load_1min_at_end"]) <= 0.051
    chart = output_dir / "report" / "figures" / f"overhead_{Path(tiny_backbone).name}.png"
    assert chart.read_bytes().startswith(PNG_SIGNATURE)


def test_a_killed_run_loses_only_the_cells_in_progress(tiny_backbone, relations, tmp_path):
    """Two jobs side by side, the whole process group killed with SIGKILL once a cell is under way."""
    output_dir = tmp_path / "killed"
    command = grid_command(tiny_backbone, [relations], output_dir, "--study", "ablation", "--methods", "lora",
                           "umema", "--seeds", "0", "--lr", "5e-3", "--jobs", "2")
    command[command.index("--max-steps") + 1] = "40"  # long enough to be caught in the middle
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "peft_umema.cli", *command], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        locks = []
        while time.monotonic() < deadline and process.poll() is None:
            locks = list((output_dir / rp.CELLS_DIR).glob(f"**/{rp.LOCK_NAME}"))
            if locks and (locks[0].parent / rp.LOG_NAME).is_file():
                break
            time.sleep(0.05)
        assert locks, "no cell started"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 60  # the workers die with the group; on a loaded machine it takes a moment
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    killed = locks[0].parent
    assert not (killed / rp.CELL_NAME).exists()
    finished_before = finished_cells(output_dir)
    assert len(finished_before) < 2

    command[command.index("--jobs") + 1] = "1"
    assert main(command) == 0
    after = finished_cells(output_dir)
    assert len(after) == 2 and str(killed.relative_to(output_dir / rp.CELLS_DIR)) in after
    assert all(after[key] == mtime for key, mtime in finished_before.items())
    records = rp.all_records(output_dir)
    assert not list((output_dir / rp.CELLS_DIR).glob(f"**/{rp.LOCK_NAME}"))
    # the cells the workers finished ran in fresh processes, the redone ones in this one
    assert {records[key]["memory"]["fresh_process"] for key in finished_before} <= {True}
    assert {records[key]["memory"]["fresh_process"] for key in set(after) - set(finished_before)} == {False}
    # both invocations are on record: the killed one as unfinished
    killed_run, rerun = rp.read_plan(output_dir, "ablation")["invocations"]
    assert killed_run["finished_at"] is None and killed_run["jobs"] == 2
    assert rerun["finished_at"] is not None and rerun["wall_seconds"] > 0
    assert "did not finish" in (output_dir / "report" / "results.md").read_text()


def test_calibration_baselines_run_in_smoke_cells(tiny_backbone, relations, tmp_path):
    """Under --max-steps SWAG collects from step 0 (its default, epoch 1 on, would collect nothing)."""
    output_dir = tmp_path / "calibration"
    assert main(grid_command(tiny_backbone, [relations], output_dir, "--study", "calibration", "--methods", "lora+ts",
                             "swag", "--seeds", "0", "--lr", "5e-3")) == 0
    records = {record["cell"]["variant"]: record for record in rp.all_records(output_dir).values()}
    assert set(records) == {"lora+ts", "swag"}
    assert records["swag"]["method_options"] == {"start_epoch": 0.0}
    assert records["swag"]["method_details"]["snapshots"]["swag"] > 0
    assert records["lora+ts"]["method_options"] == {}
    assert "temperature" in json.dumps(records["lora+ts"]["method_details"])
    markdown = (output_dir / "report" / "results.md").read_text()
    assert "| lora+ts |" in markdown and "| swag |" in markdown


def test_post_hoc_cells_start_from_the_finished_lora_cell(tiny_backbone, relations, tmp_path):
    """lora+ts reuses the lora cell's kept adapter instead of training LoRA again, with the same result."""
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    arguments = ("--study", "calibration", "--seeds", "0", "--lr", "5e-3")
    assert main(grid_command(tiny_backbone, [relations], shared, *arguments, "--methods", "lora", "lora+ts")) == 0
    assert main(grid_command(tiny_backbone, [relations], alone, *arguments, "--methods", "lora+ts")) == 0
    reused = {r["cell"]["variant"]: r for r in rp.all_records(shared).values()}
    trained = next(iter(rp.all_records(alone).values()))
    lora_run = rp.cell_dir(shared, rp.Cell.from_dict(reused["lora"]["cell"])) / rp.RUN_DIR
    for output_dir, record in ((shared, reused["lora+ts"]), (alone, trained)):
        # kept for the reliability diagrams, whether the cell trained its LoRA or started from the lora cell's
        assert (rp.cell_dir(output_dir, rp.Cell.from_dict(record["cell"])) / rp.PREDICTIONS_NAME).is_file()
    assert (lora_run / "adapter_model.safetensors").is_file()  # the base cell keeps its adapter
    assert reused["lora+ts"]["base_run"] == str(lora_run.relative_to(shared))
    assert trained["base_run"] is None
    assert reused["lora+ts"]["test"] == pytest.approx(trained["test"])
    assert reused["lora+ts"]["timings"]["fit_seconds"] >= reused["lora"]["timings"]["fit_seconds"]
    options = {"shots": reused["lora"]["cell"]["shots"], "learning_rate": 5e-3, "progress": False}
    with pytest.raises(ValueError, match="seed is 0, not 1"):
        runs.train(tiny_backbone, relations, tmp_path / "wrong", method="lora+ts", seed=1, base_run=lora_run, **options)
    with pytest.raises(ValueError, match="trains its own model"):
        runs.train(tiny_backbone, relations, tmp_path / "wrong", method="lora", base_run=lora_run, **options)


def _verdict_view(tests_by_variant_and_seed: dict) -> tuple[rp.StudyView, list]:
    settings = rp.TrainingSettings()
    cells, records = [], {}
    for (variant, seed), test in tests_by_variant_and_seed.items():
        cell = rp.Cell("train", "tiny", "data", 1000, seed, variant, 1e-3, 0.0, settings)
        cells.append(cell)
        records[cell.key] = {"task_type": "SEQ_CLS", "test": test}
    plan = {"cells": {cell.key: cell.to_dict() for cell in cells}}
    return rp.StudyView("calibration", plan, records), cells


def test_umema_verdict_compares_the_same_seeds_against_each_bar():
    lora = {"accuracy": 0.800, "ece": 0.10, "nll": 0.60, "auroc_error": 0.80, "aurc": 0.050}
    tests = {
        ("lora", 0): lora, ("lora", 1): lora,
        ("lora+ts", 0): {**lora, "ece": 0.03, "nll": 0.55}, ("lora+ts", 1): {**lora, "ece": 0.03, "nll": 0.55},
        # seed 0 only: a better UMEMA on seed 1 must not enter the means, as LoRA + TS's bar has two seeds
        ("umema", 0): {"accuracy": 0.796, "ece": 0.04, "nll": 0.50, "auroc_error": 0.70,
                       "um_confidence_auroc_error": 0.82, "aurc": 0.070, "um_confidence_aurc": 0.040},
    }
    view, cells = _verdict_view(tests)
    verdict = rp._umema_verdict(view, cells)
    assert "seeds 0)" in verdict
    assert "ECE 0.040 vs LoRA + TS 0.030 ✗" in verdict
    assert "NLL 0.500 vs LoRA + TS 0.550 ✓" in verdict
    assert "Accuracy 0.796 vs LoRA - 0.5 pt 0.795 ✓" in verdict
    assert "error AUROC 0.820 vs LoRA's softmax 0.800 ✓" in verdict  # UMEMA's own confidence, not its softmax
    assert "error AUROC 0.820 vs UMEMA's own softmax 0.700 ✓" in verdict
    assert "AURC 0.040 vs LoRA's softmax 0.050 ✓" in verdict
    assert "entity-token" not in verdict  # a sentence task has no entity tokens
    view, cells = _verdict_view({key: value for key, value in tests.items() if key[0] != "lora+ts"})
    assert rp._umema_verdict(view, cells) == ""  # no bar to compare with, no line
    token_tests = {("lora", 0): {"f1": 0.5, "entity_ece": 0.2}, ("lora+ts", 0): {"f1": 0.5, "entity_ece": 0.1},
                   ("umema", 0): {"f1": 0.49, "entity_ece": 0.15}}
    assert umema_verdict({variant: {seed: test} for (variant, seed), test in token_tests.items()}, "TOKEN_CLS") == (
        "UMEMA against its bars (seeds 0): Span F1 0.490 vs LoRA - 0.5 pt 0.495 ✗; "
        "entity-token ECE 0.150 vs LoRA + TS 0.100 ✗.")


def test_at_a_glance_says_which_bars_umema_misses_and_which_method_calibrates_best():
    lora = {"accuracy": 0.800, "ece": 0.10, "nll": 0.60, "auroc_error": 0.80, "aurc": 0.050}
    tests = {
        ("lora", 0): lora, ("lora", 1): {**lora, "accuracy": 0.780},
        ("lora+ts", 0): {**lora, "ece": 0.03, "nll": 0.55}, ("lora+ts", 1): {**lora, "ece": 0.03, "nll": 0.55},
        ("umema", 0): {"accuracy": 0.810, "ece": 0.04, "nll": 0.50, "auroc_error": 0.81, "aurc": 0.045},
        ("umema", 1): {"accuracy": 0.800, "ece": 0.04, "nll": 0.50, "auroc_error": 0.81, "aurc": 0.045},
        ("laplace", 0): {**lora, "ece": 0.01},  # one seed only: the lowest ECE, and the table says of how many
    }
    view, _ = _verdict_view(tests)
    glance = rp._at_a_glance(view)
    assert glance.startswith("## At a glance") and "UMEMA clears every bar on 0 of the 1 rows" in glance
    row = _table_row(glance, "tiny")
    assert row[1:4] == ["data", "1000", "0, 1"]
    assert row[4] == "Accuracy 0.805 / 0.790 (+1.5 pt)"
    assert row[5] == "0.040 / 0.030" and row[6] == "laplace 0.010 (1 seed)"
    assert row[7] == "5 of 6" and row[8] == "ECE 0.040 vs LoRA + TS 0.030 ✗"
    view, _ = _verdict_view({key: value for key, value in tests.items() if key[0] != "lora+ts"})
    assert rp._at_a_glance(view) == ""  # nothing to compare with, no section


def test_evaluation_subsets_bound_smoke_cells_and_leave_other_keys_unchanged(tiny_backbone, relations, tmp_path):
    """--dev-size / --test-size score every cell (and the post-hoc cell built on it) on the same fixed subsets, the
    report says the numbers are not full-test-set ones, and cells without them keep the keys they had before."""
    output_dir = tmp_path / "subsets"
    assert main(grid_command(tiny_backbone, [relations], output_dir, "--study", "calibration", "--methods", "lora",
                             "lora+ts", "--seeds", "0", "--lr", "5e-3", "--dev-size", "6", "--test-size", "10")) == 0
    records = {record["cell"]["variant"]: record for record in rp.all_records(output_dir).values()}
    assert set(records) == {"lora", "lora+ts"}
    for record in records.values():
        assert record["sizes"]["test"] == 10 and record["sizes"]["validation"] == 6
        assert record["cell"]["settings"]["test_size"] == 10
    predictions = [np.load(output_dir / rp.CELLS_DIR / record["key"] / rp.PREDICTIONS_NAME)["confidence"]
                   for record in records.values()]
    assert all(len(confidence) == 10 for confidence in predictions)
    markdown = (output_dir / "report" / "results.md").read_text()
    assert "fixed seeded subsets of dev and test" in markdown and "dev 6, test 10" in markdown
    assert "--dev-size 6 --test-size 10" in markdown

    full = rp.Cell("train", "minilm", "wnut17", 1000, 0, "lora", 1e-3, 0.0, rp.TrainingSettings(epochs=6, patience=2))
    identity = dataclasses.asdict(full)
    for name in rp.UNSET_IS_UNHASHED:
        del identity["settings"][name]
    assert full.key.endswith(hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8])
    assert dataclasses.replace(full, settings=dataclasses.replace(full.settings, test_size=10)).key != full.key


def test_train_scores_a_fixed_test_subset(tiny_backbone, relations, tmp_path):
    metrics = runs.train(tiny_backbone, relations, tmp_path / "run", method="lora", shots=16, max_steps=1, epochs=1,
                         batch_size=8, max_length=32, progress=False, test_size=7)
    assert metrics["sizes"]["test"] == 7 and metrics["full_sizes"]["test"] > 7
    with pytest.raises(SystemExit) as usage_error:
        main(["train", "--model", tiny_backbone, "--data", relations, "--output-dir", str(tmp_path / "bad"),
              "--test-size", "0"])
    assert usage_error.value.code == 2 and not (tmp_path / "bad").exists()


def test_records_written_before_a_new_setting_keep_their_keys_and_learning_rate(grid_run, tmp_path, capsys):
    """Cells recorded before `dev_size` / `test_size` existed (their settings lack them) stay finished, and their
    tuning cells still choose the learning rate of a new invocation with the same settings."""
    command, output_dir = grid_run
    old = tmp_path / "old-records"
    shutil.copytree(output_dir, old)
    for path in (old / rp.CELLS_DIR).glob(f"**/{rp.CELL_NAME}"):
        record = json.loads(path.read_text())
        for name in rp.UNSET_IS_UNHASHED:
            del record["cell"]["settings"][name]
        path.write_text(json.dumps(record))
    capsys.readouterr()
    rerun = [part if part != str(output_dir) else str(old) for part in command]
    assert main(rerun + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "ablation: 8 cells (0 to run)" in printed and "calibration: 8 cells (0 to run)" in printed
