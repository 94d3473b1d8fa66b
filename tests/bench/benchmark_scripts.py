"""Loading a script of benchmarks/ as a module, for tests of its pure parts (the scripts
themselves need a GPU)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(stem: str) -> ModuleType:
    """benchmarks/<stem>.py as module `stem`; its path is the module's __file__. Its directory is
    on sys.path, as when the script runs, so that it can import its neighbours."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(stem, BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
