"""The package's layers import downwards only (ARCHITECTURE.md): a test, so the layout stays true."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fq_compile"
# lower number = lower layer; a module may import its own layer and those below
LAYERS = {"kernels": 0, "plan": 1, "config": 1, "runtime": 2, "passes": 3, "planning": 4,
          "backend": 5, "explain": 5, "generation": 5, "deploy": 5, "": 5, "tools": 6, "__main__": 6}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top not in LAYERS and (PACKAGE / "__init__.py").exists() and not (PACKAGE / top).exists() \
            and not (PACKAGE / f"{top}.py").exists():
        top = ""                                   # `from fq_compile import calibrate`: the public API
    return LAYERS[top]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fq_compile":
            if node.module == "fq_compile":
                yield from (f"fq_compile.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "fq_compile")


def test_imports_point_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        here = _layer(module)
        upward += [f"{module} -> {target}" for target in _imports(path) if _layer(target) > here]
    assert not upward, "imports pointing up the layers (see ARCHITECTURE.md):\n" + "\n".join(sorted(upward))


def test_no_relative_imports():
    """Absolute imports make each module's layer visible at a glance."""
    rel = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
           if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not rel, rel
