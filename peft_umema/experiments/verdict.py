"""UMEMA against the bars it has to clear to be worth choosing over LoRA: at least LoRA + temperature scaling's
calibration (ECE, NLL), LoRA's accuracy less half a point, and errors detected at least as well as by the softmax.
One line for `compare`'s table and for each calibration table of `reproduce --report`, and the rows of the report's
summary."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

# How far below LoRA's score UMEMA may fall and still count as "as accurate".
SCORE_TOLERANCE = 0.005
COMPARED = ("umema", "lora", "lora+ts")


def task_metric(task_type: str) -> tuple[str, str]:
    """The score a task is judged by: its metric key and its label."""
    return ("accuracy", "Accuracy") if task_type == "SEQ_CLS" else ("f1", "Span F1")


@dataclasses.dataclass(frozen=True)
class BarCheck:
    """UMEMA's mean against one bar: `name` (e.g. "ECE"), `bar_name` (whose number the bar is)."""

    name: str
    mine: float
    bar: float
    bar_name: str
    passed: bool

    def __str__(self) -> str:
        return f"{self.name} {self.mine:.3f} vs {self.bar_name} {self.bar:.3f} {'✓' if self.passed else '✗'}"


def umema_checks(tests: Mapping[str, Mapping[int, dict]], task_type: str) -> tuple[list[int], list[BarCheck]]:
    """`tests`: method -> seed -> test metrics. The seeds every compared method has and UMEMA's means over them
    against each bar, so that no bar compares different seeds; ([], []) when a compared method has none."""
    # torch comes with it; the report imports this module at start-up
    from .methods import own_confidence_score

    if not all(tests.get(name) for name in COMPARED):
        return [], []
    seeds = sorted(set.intersection(*(set(tests[name]) for name in COMPARED)))
    if not seeds:
        return [], []
    metric, label = task_metric(task_type)

    def mean(method, key, own=False):
        values = [own_confidence_score(tests[method][seed], key) if own else tests[method][seed].get(key)
                  for seed in seeds]
        values = [value for value in values if value is not None]
        return float(np.mean(values)) if len(values) == len(seeds) else None

    def check(name, mine, bar, higher_is_better, bar_name):
        if mine is None or bar is None:
            return None
        return BarCheck(name, mine, bar, bar_name, mine >= bar if higher_is_better else mine <= bar)

    lora_score = mean("lora", metric)
    checks = [
        check("ECE", mean("umema", "ece"), mean("lora+ts", "ece"), False, "LoRA + TS"),
        check("NLL", mean("umema", "nll"), mean("lora+ts", "nll"), False, "LoRA + TS"),
        check(label, mean("umema", metric), None if lora_score is None else lora_score - SCORE_TOLERANCE, True,
              "LoRA - 0.5 pt"),
        check("error AUROC", mean("umema", "auroc_error", own=True), mean("lora", "auroc_error"), True,
              "LoRA's softmax"),
        check("error AUROC", mean("umema", "auroc_error", own=True), mean("umema", "auroc_error"), True,
              "UMEMA's own softmax"),
        # A more accurate model has fewer, harder errors, which lowers its error AUROC; the area under the
        # risk-coverage curve scores ranking and accuracy together.
        check("AURC", mean("umema", "aurc", own=True), mean("lora", "aurc"), False, "LoRA's softmax"),
        check("entity-token ECE", mean("umema", "entity_ece"), mean("lora+ts", "entity_ece"), False, "LoRA + TS"),
    ]
    return seeds, [item for item in checks if item]


def umema_verdict(tests: Mapping[str, Mapping[int, dict]], task_type: str) -> str:
    """`umema_checks` as one line; "" when there is nothing to compare."""
    seeds, checks = umema_checks(tests, task_type)
    if not checks:
        return ""
    return (f"UMEMA against its bars (seeds {', '.join(map(str, seeds))}): "
            + "; ".join(map(str, checks)) + ".")
