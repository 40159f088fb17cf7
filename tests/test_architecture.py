"""The package's layers (docs/architecture.md): imports run only down the table below, there
are no import circles, models/ is pure PyTorch, and every command answers --help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_harness import REPO, cli_env

PACKAGE = REPO / "resnet_lightning"
BASE = {"errors", "atomic_files"}
# Which parts of the package each part may import: a part is a folder or a top-level module.
ALLOWED = {
    "errors": set(),
    "atomic_files": set(),
    "models": set(),
    "data": BASE,
    "callbacks": BASE | {"models", "data"},
    "training": BASE | {"models", "data", "callbacks"},
    "tools": BASE | {"models", "data", "callbacks", "training"},
    # Entry points: `python -m resnet_lightning[.eval|.bench|.report|...]`, a few lines each.
    "__main__": {"training"},
    "eval": {"tools"},
    "bench": {"tools"},
    "report": {"tools"},
    "export": {"tools"},
    "dashboard": {"tools"},
    "__init__": set(),
}
SOURCES = sorted(PACKAGE.rglob("*.py"))
SOURCE_MODULES = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in SOURCES}
# The third-party packages models/ may use: it must be usable without Lightning or Hydra.
MODELS_MAY_IMPORT = {"torch", "torchvision", "__future__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            submodules = {f"{module}.{alias.name}" for alias in node.names}
            if not submodules <= SOURCE_MODULES:  # `from . import x, y` imports submodules only
                names.add(module)
            names |= submodules
    return names


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


PROJECT_MODULES = {module_name(path) for path in SOURCES}


def project_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m in PROJECT_MODULES}


def test_every_part_of_the_package_is_in_the_table():
    parts = {part_of(module_name(path)) for path in SOURCES}
    assert parts == set(ALLOWED), parts ^ set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_run_down_the_layers(path):
    part = part_of(module_name(path))
    for module in project_imports(path):
        target = part_of(module)
        if module != "resnet_lightning" and target != part:
            assert target in ALLOWED[part], f"{part} may not import {module}"


def test_no_import_circles():
    graph = {module_name(p): project_imports(p) - {module_name(p)} for p in SOURCES}
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path, module]))
        if module in finished:
            return
        for imported in graph.get(module, ()):
            visit(imported, [*path, module])
        finished.add(module)

    for module in graph:
        visit(module, [])


def test_models_are_pure_pytorch():
    for path in (PACKAGE / "models").rglob("*.py"):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top and top != "resnet_lightning" and top not in sys.stdlib_module_names:
                assert top in MODELS_MAY_IMPORT, f"{path.name} imports {module}"


def test_entry_points_are_thin():
    commands = ("__main__", "eval", "bench", "report", "export", "dashboard", "models/__main__")
    for name in (f"{command}.py" for command in commands):
        lines = [line for line in (PACKAGE / name).read_text().splitlines() if line.strip()]
        assert len(lines) <= 12, name


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["resnet_lightning", "--help"], "Powered by Hydra"),
        pytest.param(["resnet_lightning.eval", "--help"], "ckpt_path=", marks=pytest.mark.slow),
        pytest.param(
            ["resnet_lightning.report", "--help"],
            "{summary,params,compare,degradation}",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["resnet_lightning.report", "params", "--help"],
            "config overrides",
            marks=pytest.mark.slow,
        ),
        pytest.param(["resnet_lightning.bench", "--help"], "--sections", marks=pytest.mark.slow),
        pytest.param(["resnet_lightning.export", "--help"], "format=onnx", marks=pytest.mark.slow),
        # The model zoo's table, a row per model as it is counted.
        pytest.param(
            ["resnet_lightning.models"],
            "| resnet56 | ResNet (CIFAR) | 32 | 853,018 |",
            marks=pytest.mark.slow,  # about a minute on a slow 2-core machine: make test-all
        ),
    ],
    ids=lambda c: " ".join(c) if isinstance(c, list) else None,
)
def test_every_command_answers(command, expected):
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
