"""The `fq-compile` console script.

Importing anything under `fq_compile` runs the package's __init__, which imports torch and transformers
(~4 s) to register the fq:: ops and the backend.  This launcher lives outside the package so that
`fq-compile -h` and a mistyped argument answer at once: it parses the command line with
fq_compile/tools/cli_parser.py (standard library only), loaded by its path, and imports the package only
to run the command (fq_compile/tools/cli.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _parser_module():
    """fq_compile/tools/cli_parser.py of the fq_compile that `import fq_compile` would load, run without the
    package's __init__ (find_spec locates a top-level package without importing it)."""
    spec = importlib.util.find_spec("fq_compile")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("fq-compile: error: the fq_compile package is not importable")
    path = Path(list(spec.submodule_search_locations)[0]) / "tools" / "cli_parser.py"
    spec = importlib.util.spec_from_file_location("_fq_compile_cli_parser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = _parser_module().build_parser().parse_args(argv)
    from fq_compile.tools.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
