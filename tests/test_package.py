"""The package's shape: a light import, one error hierarchy, no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightly_mcp
from lightly_mcp import errors

PACKAGE = Path(lightly_mcp.__file__).parent


def test_import_loads_no_lightning_rich_or_recipe_layer() -> None:
    code = (
        "import sys, lightly_mcp; "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'rich', "
        "'lightly_mcp.app.recipe', 'lightly_mcp.methods.mcp', 'lightly_mcp.methods.moco_v2') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_methods_are_imported_on_first_use() -> None:
    from lightly_mcp.methods.mcp import MCP
    from lightly_mcp.methods.moco_v2 import MoCoV2

    assert lightly_mcp.MCP is MCP and lightly_mcp.MoCoV2 is MoCoV2
    try:
        lightly_mcp.NoSuchThing  # noqa: B018
    except AttributeError as error:
        assert "NoSuchThing" in str(error)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_every_exception_class_lives_in_errors_py() -> None:
    defined = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(base) for base in node.bases}
                if any(b.endswith(("Error", "Exception", "Warning")) for b in bases):
                    defined.append((path.relative_to(PACKAGE).as_posix(), node.name))
    assert defined and {path for path, _ in defined} == {"errors.py"}, defined


def test_user_errors_are_input_errors_and_value_errors() -> None:
    for name in (
        "RecipeError",
        "DatasetError",
        "CheckpointError",
        "UnsafeCheckpointError",
        "CodeFileError",
        "ProvenanceError",
        "OutputFolderError",
        "ExportError",
        "PreflightError",
        "UnsupportedBackboneError",
        "NoPrunableGroupsError",
        "TrainingDivergedError",
    ):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.InputError), name
        assert issubclass(cls, ValueError), name
    assert issubclass(errors.LateStageError, errors.MCPError)
    assert not issubclass(errors.LateStageError, errors.InputError)
    assert issubclass(errors.StageInterrupted, errors.MCPError)


def _imports(path: Path) -> set[str]:
    """The ``lightly_mcp`` modules a file imports, at module level or inside
    functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("lightly_mcp"):
                found.add(node.module)
                # ``from lightly_mcp.app import pipeline`` imports the module too.
                found.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if (
                        PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py"
                    ).is_file()
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightly_mcp"))
    return found


def _module_name(path: Path) -> str:
    parts = ["lightly_mcp", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_between_modules() -> None:
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    # A package's __init__ re-exports its modules; an import of the package name
    # means that __init__.
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    graph["lightly_mcp"] = set()  # the top level only re-exports, lazily for methods
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        seen[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if seen.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep)
        stack.pop()
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module)


def test_benchmarks_and_examples_import_no_private_name() -> None:
    root = PACKAGE.parent
    private = []
    for folder in ("benchmarks", "examples"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "lightly_mcp"
                ):
                    private += [
                        f"{path.relative_to(root)}: {node.module}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_")
                    ]
    assert private == []


#: The package's layers, lowest first: a module imports only from its own layer and
#: the layers below it (README's module map draws the same order).
LAYERS = (
    "errors",
    "io",
    "pruning",
    "methods",
    "formats",
    "data",
    "benchmarking",
    "app",
)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer_folder() -> None:
    loose = [
        path.name
        for path in PACKAGE.glob("*.py")
        if path.stem not in ("__init__", "__main__", "errors")
    ]
    assert loose == []
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == set(
        LAYERS[1:]
    )


def test_layers_import_only_downwards() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        own = _layer(module)
        if own is None:
            continue  # lightly_mcp/__init__.py and __main__.py sit above the layers
        for dep in _imports(path):
            layer = _layer(dep)
            if layer is not None and LAYERS.index(layer) > LAYERS.index(own):
                upward.append(f"{module} imports {dep}")
    assert upward == []


def test_the_algorithm_needs_no_lightning_and_no_files() -> None:
    """``lightly_mcp.pruning`` is plain torch.nn and torch-pruning."""
    found = []
    for path in (PACKAGE / "pruning").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += [
                f"{path.name}: {name}"
                for name in names
                if name.split(".")[0] in ("pytorch_lightning", "lightning", "rich")
                or name.startswith("lightly_mcp.io")
            ]
    assert found == []


def test_tests_mirror_the_package() -> None:
    """``tests/<folder>/test_<module>.py`` for ``lightly_mcp/<folder>/<module>.py``."""
    tests = PACKAGE.parent / "tests"
    assert {p.name for p in tests.iterdir() if (p / "__init__.py").is_file()} == set(
        LAYERS[1:]
    )
    folder_of = {
        path.stem: path.parent.name
        for path in PACKAGE.glob("*/*.py")
        if path.stem != "__init__"
    }
    misplaced = [
        path.relative_to(tests).as_posix()
        for path in tests.rglob("test_*.py")
        if path.stem[5:] in folder_of and path.parent.name != folder_of[path.stem[5:]]
    ]
    assert misplaced == []
