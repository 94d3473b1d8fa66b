"""tally.ptx: read, check and transform PTX kernels so that best-effort work can
run in slices or as (preemptible) persistent thread blocks.

Stages, one module each: `parse` (reader/writer), `analysis` (what a kernel
uses, refusal reasons), `transform` (slice / ptb / preemptible), `abi` (the
appended parameters, the preemption state, host-side launch helpers),
`ptxas` (finding ptxas, assembling), `cli` (`tally ptx ...`).
"""
from tally.ptx.analysis import MODES, refusal
from tally.ptx.parse import Module, parse, read_module
from tally.ptx.transform import transform_module

__all__ = ["MODES", "Module", "parse", "read_module", "refusal", "transform_module"]
