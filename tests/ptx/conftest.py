"""Shared fixtures of the PTX tests: the corpus, its manifest, ptxas."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tally.errors import TallyError

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
CORPUS_FILES = sorted(CORPUS.glob("*/*.ptx"))
MODES = ("slice", "ptb", "preemptible")


@pytest.fixture(scope="session")
def ptxas_path():
    """ptxas is required: CI must prove assembly, so a missing ptxas fails loudly."""
    from tally.ptx.ptxas import find_ptxas

    try:
        return find_ptxas()
    except TallyError as exc:
        pytest.fail(f"ptxas is required for the PTX assembly tests: {exc}")


@pytest.fixture(scope="session")
def assembled_corpus(ptxas_path):
    """{(file, mode or 'original'): (AssemblyResult, ModuleResult|None)}: every corpus
    module, untransformed and transformed in every mode, assembled once (ptxas -v,
    so `resources` has per-function registers / static shared memory), in parallel."""
    from tally.ptx.parse import read_module
    from tally.ptx.ptxas import assemble
    from tally.ptx.transform import transform_module

    jobs = {}
    for path in CORPUS_FILES:
        module = read_module(path)
        jobs[(path.name, "original")] = (module.text, None)
        for mode in MODES:
            result = transform_module(module, mode)
            jobs[(path.name, mode)] = (result.text, result)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(assemble, text, None, ptxas_path, verbose=True) for key, (text, _) in jobs.items()}
        return {key: (future.result(), jobs[key][1]) for key, future in futures.items()}
