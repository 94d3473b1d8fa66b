"""tally.blocksched: the CPU-side core of block-level scheduling.

What best-effort kernels run as, and where their transformed code comes from:

`candidates`  the launch configurations worth measuring for one (kernel, grid,
              block): the original kernel, slices, PTB and preemptible PTB, per
              the paper's rules, built on `tally.ptx.abi`'s host helpers.
`choose`      the choice among them as a pure function of recorded
              measurements (speed vs the original, turnaround vs the bound),
              with a human-readable reason.
`decisions`   the per-program file of measurements and decisions (versioned,
              checksummed; a corrupt or foreign file is ignored with a warning).
`cache`       transformed kernels on disk, keyed by content hash, refusals
              included, so a second run pays nothing.
`cli`         `tally blocksched show|candidates|cache`.

Nothing here touches a GPU; docs/blocksched.md says what the agent still lacks.
"""
from tally.blocksched.candidates import Candidate, enumerate_candidates, parse_config
from tally.blocksched.choose import Decision, KernelRecord, Measurement, Policy, choose

__all__ = ["Candidate", "Decision", "KernelRecord", "Measurement", "Policy", "choose", "enumerate_candidates",
           "parse_config"]
