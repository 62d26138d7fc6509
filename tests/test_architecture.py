"""The source's shape, read from its syntax trees: data flows forward through the training stages, the core package
never imports the training side, imports sit at the top of each file, and functions stay short."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `braindino.train`'s stages in the order data flows through them: each may import only the ones before it.
# `release` (model cards, Hub upload) comes before the stages that export, and imports none of them.
TRAIN_STAGES = ["data", "encoding", "release", "pretraining", "heads", "evaluation", "quickstart", "cli", "__main__"]
CORE_FOLDERS = ["modeling_braindino", "pipelines", "spaces"]
ARGUMENT_TABLES = {("train/cli.py", "build_parser")}  # one add_argument per line; splitting it would only scatter it
MAX_FUNCTION_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py") if "__pycache__" not in path.parts)


def _imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(module, statement, inside a function) for every import of `path`."""
    tree, found = ast.parse(path.read_text()), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def _stage(path: Path) -> str:
    parts = path.relative_to(REPO / "train").parts
    return parts[0] if len(parts) > 1 else path.stem


@pytest.mark.parametrize("path", _sources("train"), ids=lambda path: str(path.relative_to(REPO)))
def test_training_stages_import_only_earlier_stages(path):
    stage = _stage(path)
    if stage == "__init__":
        return
    for module, statement, _ in _imports(path):
        if module.startswith("braindino.train."):
            target = module.split(".")[2]
            assert target == stage or TRAIN_STAGES.index(target) < TRAIN_STAGES.index(stage), (
                f"{path.relative_to(REPO)}:{statement.lineno}: {stage} imports {module}, a later stage")


@pytest.mark.parametrize("path", _sources(*CORE_FOLDERS), ids=lambda path: str(path.relative_to(REPO)))
def test_core_package_never_imports_the_training_side(path):
    for module, statement, _ in _imports(path):
        assert not module.startswith("braindino.train"), f"{path.relative_to(REPO)}:{statement.lineno}: imports {module}"


def test_imports_sit_at_the_top_of_each_training_file():
    hidden = [f"{path.relative_to(REPO)}:{statement.lineno}: {module}" for path in _sources("train")
              for module, statement, in_function in _imports(path) if in_function]
    assert hidden == []


def test_functions_stay_short():
    long = []
    for path in _sources("train", "pipelines", "spaces"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                name = (path.relative_to(REPO).as_posix(), node.name)
                if lines > MAX_FUNCTION_LINES and name not in ARGUMENT_TABLES:
                    long.append(f"{name[0]}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


def test_the_stage_list_names_every_training_stage():
    """A new sub-package must be placed in the chain, not slip past the check."""
    stages = {_stage(path) for path in _sources("train")} - {"__init__"}
    assert stages == set(TRAIN_STAGES)
