"""Workload registry: name -> spec, and how a worker process builds one.

A workload reference is one of
  NAME[@VARIANT]     a registered workload, e.g. "bert-infer", "llama-decode@eager"
  module:function    a user entry point: function(role, options) -> object with step()
  command            the worker's --command line (see CommandWorkload)

Built workloads expose `step()`, which runs ONE inference request (role hp) or
ONE training step (role be) and returns only when its GPU work has completed,
plus `info() -> dict` and `close()`. The worker timestamps around `step()`.

Nothing here imports torch; the PyTorch factories live in
tally.bench.torch_workloads and the CUDA microbenchmark in tally.bench.micro,
imported by the worker process only.
"""
from __future__ import annotations

import fcntl
import importlib
import os
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from tally.errors import TallyError

TRAIN, INFER = "train", "infer"
ROLE_KIND = {"hp": INFER, "be": TRAIN}


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    kind: str  # "train" | "infer"
    summary: str
    batch_size: int
    precision: str
    variants: tuple[str, ...]  # the first is the default
    factory: str  # "module:function", called as function(spec, variant, options)
    details: dict = field(default_factory=dict)  # sequence length, image size, ... for docs and results
    needs_gpu: bool = True
    fake: bool = False

    def to_json(self) -> dict:
        out = asdict(self)
        out["variants"] = list(self.variants)
        return out


_TW = "tally.bench.torch_workloads"
_MICRO = "tally.bench.micro"

REGISTRY: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in [
        # ---- training (best effort) ----
        WorkloadSpec("resnet50-train", TRAIN, "torchvision ResNet-50, ImageNet-shaped random data, SGD+momentum",
                     64, "amp-bf16", ("eager", "compile", "compile-triton"), f"{_TW}:resnet50_train",
                     {"image": "3x224x224", "memory_format": "channels_last"}),
        WorkloadSpec("bert-base-train", TRAIN, "BERT-base encoder (12x768), masked-LM head, AdamW",
                     32, "amp-bf16", ("eager", "compile", "compile-triton"), f"{_TW}:bert_train",
                     {"layers": 12, "hidden": 768, "heads": 12, "seq": 128, "vocab": 30522}),
        WorkloadSpec("bert-large-train", TRAIN, "BERT-large encoder (24x1024), masked-LM head, AdamW",
                     16, "amp-bf16", ("eager", "compile"), f"{_TW}:bert_train",
                     {"layers": 24, "hidden": 1024, "heads": 16, "seq": 128, "vocab": 30522}),
        WorkloadSpec("gpt2-train", TRAIN, "GPT-2 medium decoder (24x1024, 355M), causal LM, AdamW",
                     8, "amp-bf16", ("eager", "compile", "compile-triton"), f"{_TW}:gpt2_train",
                     {"layers": 24, "hidden": 1024, "heads": 16, "seq": 1024, "vocab": 50257}),
        WorkloadSpec("whisper-train", TRAIN, "Whisper-small-like encoder-decoder (12+12 x 768), 30 s log-mel input",
                     8, "amp-bf16", ("eager", "compile"), f"{_TW}:whisper_train",
                     {"layers": "12+12", "hidden": 768, "heads": 12, "mel": "80x3000", "target_tokens": 128,
                      "vocab": 51865}),
        WorkloadSpec("pointnet-train", TRAIN, "PointNet classifier (input T-Net, shared MLP 64-128-1024, 40 classes)",
                     64, "amp-bf16", ("eager", "compile"), f"{_TW}:pointnet_train",
                     {"points": 2048, "classes": 40}),
        # ---- inference (high priority) ----
        WorkloadSpec("resnet50-infer", INFER, "torchvision ResNet-50 classification",
                     32, "bf16", ("eager", "graph", "compile"), f"{_TW}:resnet50_infer",
                     {"image": "3x224x224", "memory_format": "channels_last"}),
        WorkloadSpec("bert-infer", INFER, "BERT-base encoder (12x768) sequence classification",
                     32, "bf16", ("eager", "graph", "compile"), f"{_TW}:bert_infer",
                     {"layers": 12, "hidden": 768, "heads": 12, "seq": 128, "vocab": 30522}),
        WorkloadSpec("yolo-infer", INFER, "YOLO-like detector (CSP backbone, SPPF, PAN neck, 3-scale head, 80 classes)",
                     8, "bf16", ("eager", "graph", "compile"), f"{_TW}:yolo_infer",
                     {"image": "3x640x640", "width": "0.5 (~YOLOv8s)"}),
        WorkloadSpec("llama-decode", INFER,
                     "Llama-style decoder ~1.2B (16x2048, GQA 32/8, RMSNorm, RoPE), prefill 128 + 32 greedy tokens "
                     "with a static KV cache",
                     16, "bf16", ("graph", "eager"), f"{_TW}:llama_decode",
                     {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "ffn": 8192, "vocab": 128256,
                      "prompt": 128, "new_tokens": 32}),
        WorkloadSpec("gptneo-infer", INFER,
                     "GPT-Neo-1.3B-like decoder (24x2048, alternating global/local-256 attention), scoring a batch of "
                     "prompts (one forward)",
                     4, "bf16", ("eager", "graph", "compile"), f"{_TW}:gptneo_infer",
                     {"layers": 24, "hidden": 2048, "heads": 16, "seq": 512, "window": 256, "vocab": 50257}),
        # ---- DESIGN.md fact 5 microbenchmark pair (CUDA driver API + NVRTC, no torch) ----
        WorkloadSpec("micro-hp", INFER, "20 sequential `work` kernels of 264x128 threads (~0.3 ms alone)",
                     1, "fp32", ("driver",), f"{_MICRO}:micro_hp",
                     {"kernels": 20, "blocks": 264, "threads": 128, "iters": 2000}),
        WorkloadSpec("micro-be", TRAIN, "4 back-to-back `work` kernels of 2112x256 threads (~1.07 ms each) per step",
                     1, "fp32", ("driver",), f"{_MICRO}:micro_be",
                     {"kernels_per_step": 4, "blocks": 2112, "threads": 256, "iters": 20000}),
        # micro-be from PTX (the driver JITs it): the agent sees the PTX that block-level scheduling transforms
        WorkloadSpec("micro-be-ptx", TRAIN, "micro-be loaded from PTX (driver JIT): 4 `work` kernels of 2112x256 "
                     "threads (~1.07 ms each) per step",
                     1, "fp32", ("ptx",), f"{_MICRO}:micro_be",
                     {"kernels_per_step": 4, "blocks": 2112, "threads": 256, "iters": 20000, "image": "ptx"}),
        # the same work per kernel in 16x the blocks of 1/16 the length: short blocks, fine slices
        WorkloadSpec("micro-be-short", TRAIN, "micro-be's work per kernel in short blocks, from PTX: 4 `work` kernels "
                     "of 33792x256 threads, iters 1250 (a block ~1/16 of micro-be's) per step",
                     1, "fp32", ("ptx",), f"{_MICRO}:micro_be",
                     {"kernels_per_step": 4, "blocks": 33792, "threads": 256, "iters": 1250, "image": "ptx"}),
        # ---- fakes for CPU tests: sleep instead of computing ----
        WorkloadSpec("fake-infer", INFER, "CPU test fake: a request sleeps service_ms (default 5 ms)",
                     1, "none", ("sleep",), "tally.bench.workloads:fake_factory", {"service_ms": 5.0},
                     needs_gpu=False, fake=True),
        WorkloadSpec("fake-train", TRAIN, "CPU test fake: a step sleeps step_ms (default 20 ms)",
                     1, "none", ("sleep",), "tally.bench.workloads:fake_factory", {"step_ms": 20.0},
                     needs_gpu=False, fake=True),
    ]
}

ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class WorkloadRef:
    """A parsed workload reference."""

    text: str
    spec: WorkloadSpec | None  # None for entry points and commands
    variant: str
    entry_point: str | None = None
    command: str | None = None

    @property
    def fake(self) -> bool:
        return self.spec is not None and self.spec.fake

    def describe(self) -> dict:
        out: dict[str, Any] = {"ref": self.text, "variant": self.variant}
        if self.spec is not None:
            out.update(self.spec.to_json())
        if self.entry_point:
            out["entry_point"] = self.entry_point
        if self.command:
            out["command"] = self.command
        return out


COMMAND_REF = "command"


def parse_ref(text: str, role: str | None = None, command: str | None = None) -> WorkloadRef:
    """Parse NAME[@VARIANT] / module:function / 'command' (with `command`); check the kind fits the role."""
    text = text.strip()
    if text == COMMAND_REF:
        if not command:
            raise TallyError("workload 'command' needs a command line (--hp-cmd / --be-cmd)")
        return WorkloadRef(text=COMMAND_REF, spec=None, variant="command", command=command)
    if ENTRY_POINT.match(text):
        return WorkloadRef(text=text, spec=None, variant="entry-point", entry_point=text)
    name, _, variant = text.partition("@")
    spec = REGISTRY.get(name)
    if spec is None:
        raise TallyError(
            f"unknown workload {name!r} (registered: {', '.join(REGISTRY)}; or give module:function)"
        )
    variant = variant or spec.variants[0]
    if variant not in spec.variants:
        raise TallyError(f"workload {name} has no variant {variant!r} (variants: {', '.join(spec.variants)})")
    if role is not None and spec.kind != ROLE_KIND[role]:
        raise TallyError(
            f"workload {name} is a {spec.kind} workload; role {role} needs {ROLE_KIND[role]} "
            f"(e.g. {'bert-infer' if role == 'hp' else 'resnet50-train'})"
        )
    return WorkloadRef(text=f"{name}@{variant}" if variant != spec.variants[0] else name, spec=spec, variant=variant)


def real_workloads(kind: str) -> list[str]:
    """Registered non-fake, non-micro workloads of a kind, in registry order."""
    return [n for n, s in REGISTRY.items() if s.kind == kind and not s.fake and not n.startswith("micro-")]


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> dict with ints/floats converted."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TallyError(f"workload option {pair!r} is not KEY=VALUE")
        out[key] = _convert(value)
    return out


def _convert(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def build(ref: WorkloadRef, role: str, options: dict[str, Any]):
    """Build the workload in this (worker) process."""
    if ref.command is not None:
        return CommandWorkload(ref.command, role)
    if ref.entry_point is not None:
        module_name, attr = ref.entry_point.split(":")
        function = _import(module_name, attr, f"entry point {ref.entry_point}")
        workload = function(role, dict(options))
        if not callable(getattr(workload, "step", None)):
            raise TallyError(f"entry point {ref.entry_point} returned {type(workload).__name__}, which has no step()")
        return workload
    assert ref.spec is not None
    module_name, attr = ref.spec.factory.split(":")
    factory = _import(module_name, attr, f"workload {ref.spec.name}")
    return factory(ref.spec, ref.variant, dict(options))


def _import(module_name: str, attr: str, what: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TallyError(f"{what}: cannot import {module_name}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TallyError(f"{what}: {module_name} has no attribute {attr}") from None


def workload_info(workload) -> dict:
    info = getattr(workload, "info", None)
    return dict(info()) if callable(info) else {}


# ---------------------------------------------------------------- fakes (CPU tests)

FAKE_GPU_LOCK_ENV = "TALLY_BENCH_FAKE_GPU_LOCK"


class SleepWorkload:
    """A step sleeps for a fixed time. With $TALLY_BENCH_FAKE_GPU_LOCK set, each step
    holds an exclusive flock on that file, so two fakes in different processes
    serialize like time-sliced kernels and a co-located run shows interference."""

    def __init__(self, seconds: float, yield_s: float):
        self.seconds = seconds
        # after releasing the "GPU", a trainer pauses briefly so a waiting
        # server can take the lock (flock is not FIFO)
        self.yield_s = yield_s
        lock_path = os.environ.get(FAKE_GPU_LOCK_ENV)
        self._lock = open(lock_path, "a") if lock_path else None

    def step(self) -> None:
        if self._lock is None:
            time.sleep(self.seconds)
            return
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            time.sleep(self.seconds)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        if self.yield_s:
            time.sleep(self.yield_s)

    def info(self) -> dict:
        return {"device": "fake (sleep)", "step_s": self.seconds, "fake_gpu_lock": self._lock is not None}

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()


def fake_factory(spec: WorkloadSpec, variant: str, options: dict) -> SleepWorkload:
    if spec.kind == INFER:
        return SleepWorkload(float(options.get("service_ms", spec.details["service_ms"])) / 1e3, 0.0)
    return SleepWorkload(float(options.get("step_ms", spec.details["step_ms"])) / 1e3, 0.001)


# ---------------------------------------------------------------- user command lines

class CommandWorkload:
    """A user's program as a workload, driven through a line protocol on its stdin/stdout.

    role hp: the worker writes one line ("request\\n") per request to the
    program's stdin; the program answers with one line on stdout when the
    request has completed (its GPU work synchronized).
    role be: the program prints one line on stdout after every training step.
    Lines are read one at a time, so anything else the program prints belongs
    on stderr. The program runs in the worker's process group and is stopped
    with it.
    """

    def __init__(self, command: str, role: str):
        self.command = command
        self.role = role
        try:
            self.process = subprocess.Popen(
                shlex.split(command), stdin=subprocess.PIPE if role == "hp" else subprocess.DEVNULL,
                stdout=subprocess.PIPE, text=True, bufsize=1,
            )
        except OSError as exc:
            raise TallyError(f"cannot start workload command {command!r}: {exc}") from None

    def step(self) -> None:
        if self.role == "hp":
            assert self.process.stdin is not None
            self.process.stdin.write("request\n")
            self.process.stdin.flush()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            rc = self.process.wait()
            raise TallyError(f"workload command {self.command!r} exited (status {rc}) instead of answering")

    def info(self) -> dict:
        return {"command": self.command, "pid": self.process.pid}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
