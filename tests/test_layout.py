"""The package layout holds: every package imports on its own in a fresh interpreter (no import circles), and the
library never imports the experiment drivers, the hub helper or the command line."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_umema"
LIBRARY = ("tuner", "uncertainty", "memory", "training", "evaluation", "data", "baselines", "constants")
ABOVE_THE_LIBRARY = ("experiments", "hub", "cli")
# every package, and the experiment drivers one by one (they import each other: the likeliest place for a circle)
MODULES = sorted(
    [f"peft_umema.{path.name}" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()]
    + [f"peft_umema.{path.stem}" for path in PACKAGE.glob("*.py") if path.name != "__init__.py"]
    + [f"peft_umema.experiments.{path.stem}" for path in (PACKAGE / "experiments").glob("*.py")
       if path.name != "__init__.py"]
)


@pytest.mark.parametrize("module", MODULES)
def test_each_package_imports_first_in_a_fresh_interpreter(module):
    """The module imported before anything else of ours, in its own interpreter: a circle would fail here."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]


def imported_names(path: Path) -> set[str]:
    """Absolute names of what `path` imports at module level (relative imports resolved against its package).
    Imports inside functions are the way optional features reach upward (`UMEMATrainer.push_to_hub` uses the hub
    helper); they cannot form an import circle, so they are not counted."""
    parts = ("peft_umema",) + path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join(base + ((node.module,) if node.module else ()))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_never_imports_experiments_hub_or_cli(package):
    root = PACKAGE / package
    files = list(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    offending = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in imported_names(path)
            if any(name == f"peft_umema.{top}" or name.startswith(f"peft_umema.{top}.") for top in ABOVE_THE_LIBRARY)
        )
        for path in files
    }
    assert not {path: names for path, names in offending.items() if names}


def test_shared_constants_are_defined_once():
    definitions = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in ("IGNORE_INDEX", "HEAD_MODULE_NAMES", "SEQ_CLS",
                                                                      "TOKEN_CLS", "MODULES_ATTR"):
                        definitions.setdefault(target.id, []).append(str(path.relative_to(PACKAGE)))
    assert {name: files for name, files in definitions.items() if len(files) > 1} == {}
