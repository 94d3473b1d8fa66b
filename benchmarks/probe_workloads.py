"""Best-effort stand-ins for `tally bench --be module:function` (PYTHONPATH=benchmarks) that isolate
what a real BE job changes for HP besides its kernels.

  probe_workloads:idle_context   a BE process with a CUDA context and GPU memory (options: gib,
                                 default 16; touch, default 1: fill the memory with one kernel, or
                                 with touch=0 run none) that then never uses the GPU:
                                 a step sleeps 20 ms. Next to it, HP meets a second MPS client
                                 and its memory, and no BE work at all.
"""
from __future__ import annotations

import time


class IdleContext:
    def __init__(self, gib: float, touch: bool = True):
        import torch

        self.memory = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda")
        if touch:  # one kernel: the pages are the GPU's from here on
            self.memory.fill_(1)
        torch.cuda.synchronize()
        self.gib = gib

    def step(self) -> None:
        time.sleep(0.020)

    def info(self) -> dict:
        return {"gib": self.gib}

    def close(self) -> None:
        del self.memory


def idle_context(role: str, options: dict) -> IdleContext:
    touch = options.get("touch", True)
    if isinstance(touch, str):
        touch = touch.strip().lower() not in ("0", "false", "no", "off")
    return IdleContext(float(options.get("gib", 16)), bool(touch))
