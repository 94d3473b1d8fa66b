"""The microbenchmark pair of DESIGN.md fact 5, without torch: CUDA driver API + NVRTC via ctypes.

The kernel is `work` of shared/reference/microbench_colo.cu: a dependent
floating-point loop whose length (`iters`) sets the kernel time.

  micro-hp: a request = `kernels` (20) sequential launches of blocks x threads
            (264 x 128, iters 2000), ~0.3 ms in all when alone, then a stream sync
  micro-be: a step = `kernels_per_step` (4) launches of 2112 x 256 (iters 20000,
            ~1.07 ms each), then a stream sync (as the reference's BE loop)
  micro-be-ptx:   micro-be, but the module is loaded from PTX (see below)
  micro-be-short: PTX too, the same work per kernel in 16x the blocks of 1/16 the
            length (33792 x 256, iters 1250): blocks short enough for block-level
            scheduling to slice a kernel finely (a slice is at least one block)

Kernels go through cuLaunchKernel on a non-blocking stream, so the tally agent
(CUPTI driver callbacks) sees every launch. With
TALLY_BENCH_HP_STREAM_PRIORITY=high the HP stream gets the context's greatest
priority (cuCtxGetStreamPriorityRange).

NVRTC compiles to a cubin for the device's exact architecture (no PTX JIT, so
a toolkit newer than the driver still works); libnvrtc is looked up in the
NVIDIA wheels (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib), on the loader path,
and in /usr/local/cuda.

image "ptx" (micro-be-ptx, micro-be-short, or option image=ptx): NVRTC compiles
for the device's virtual architecture (compute_XY) and the NUL-terminated PTX
text goes to cuModuleLoadData, so the driver JITs it. This is how a program
hands the tally agent the PTX that block-level scheduling transforms. An NVRTC
newer than the driver may write a PTX .version the driver cannot JIT
(CUDA_ERROR_UNSUPPORTED_PTX_VERSION): a one-line error says so.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import site
import sys

from tally.errors import TallyError

KERNEL_SOURCE = r"""
extern "C" __global__ void work(float* out, int iters) {
  float a = threadIdx.x * 0.001f, b = blockIdx.x * 0.0001f;
  for (int i = 0; i < iters; i++) { a = a * 1.0000001f + b; b = b * 0.9999999f + a * 1e-7f; }
  if (a == 12345.f) out[blockIdx.x] = a + b;
}
"""

HP_STREAM_PRIORITY_ENV = "TALLY_BENCH_HP_STREAM_PRIORITY"
CU_STREAM_NON_BLOCKING = 0x1
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
NVRTC_SUCCESS = 0
CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222
IMAGE_KINDS = ("cubin", "ptx")


def _nvrtc_candidates() -> list[str]:
    roots = list(sys.path)
    try:
        roots += site.getsitepackages()
    except AttributeError:
        pass
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for pattern in ("nvidia/cu13/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*",
                        "nvidia/cu12/lib/libnvrtc.so*"):
            found += sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p)
    found += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    found += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    return found


def load_nvrtc() -> ctypes.CDLL:
    errors = []
    for candidate in _nvrtc_candidates():
        # NVRTC dlopens libnvrtc-builtins by soname at compile time; the wheels keep it next to
        # libnvrtc but outside the loader path, so load it first (a loaded soname satisfies dlopen)
        directory = os.path.dirname(candidate)
        if directory:
            for builtins in sorted(glob.glob(os.path.join(directory, "libnvrtc-builtins.so*"))):
                try:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
        try:
            return ctypes.CDLL(candidate)
        except OSError as exc:
            errors.append(str(exc))
    raise TallyError("micro workloads need NVRTC (libnvrtc.so): not found in the NVIDIA wheels, the loader path "
                     "or /usr/local/cuda")


def compile_kernel(arch: str, nvrtc: ctypes.CDLL | None = None) -> tuple[bytes, str]:
    """Compile KERNEL_SOURCE with NVRTC for `arch` (e.g. "sm_90"); returns (image, kind) with kind cubin|ptx."""
    nvrtc = nvrtc or load_nvrtc()
    prog = ctypes.c_void_p()
    _nvrtc_check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), KERNEL_SOURCE.encode(), b"work.cu", 0, None,
                                                 None), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={arch}".encode()]
        array = (ctypes.c_char_p * len(options))(*options)
        rc = nvrtc.nvrtcCompileProgram(prog, len(options), array)
        if rc != NVRTC_SUCCESS:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise TallyError(f"NVRTC could not compile the micro kernel for {arch}: "
                             f"{log.value.decode(errors='replace').strip().splitlines()[-1:]}")
        size = ctypes.c_size_t()
        if arch.startswith("sm_") and nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)) == NVRTC_SUCCESS \
                and size.value > 0:
            image = ctypes.create_string_buffer(size.value)
            _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
            return image.raw, "cubin"
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        image = ctypes.create_string_buffer(size.value)
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetPTX(prog, image), "nvrtcGetPTX")
        return ptx_image(image.raw), "ptx"
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def ptx_image(raw: bytes) -> bytes:
    """PTX text as cuModuleLoadData takes it: the text up to its first NUL, and one NUL."""
    return raw.split(b"\0", 1)[0] + b"\0"


def ptx_version(ptx: bytes) -> str | None:
    """The `.version X.Y` directive of PTX text, or None."""
    match = re.search(rb"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    return match.group(1).decode() if match else None


def unsupported_ptx_message(ptx: bytes, driver_version: int | None) -> str:
    """The one-line error for CUDA_ERROR_UNSUPPORTED_PTX_VERSION: NVRTC newer than the driver."""
    version = ptx_version(ptx)
    driver = f"CUDA {driver_version // 1000}.{driver_version % 1000 // 10}" if driver_version else "its CUDA version"
    return (f"the driver cannot JIT the micro kernel's PTX (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): NVRTC wrote PTX "
            f"{'.version ' + version if version else 'of a version'} newer than this driver ({driver}) supports; "
            f"use an NVRTC (nvidia-cuda-nvrtc wheel) no newer than the driver, or a newer driver")


def _nvrtc_check(nvrtc, rc: int, what: str) -> None:
    if rc != NVRTC_SUCCESS:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise TallyError(f"{what} failed: {nvrtc.nvrtcGetErrorString(rc).decode()}")


class Driver:
    """The few CUDA driver calls the micro workloads make."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise TallyError("micro workloads need the CUDA driver (libcuda.so.1 not found)") from None
        self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.lib.cuLaunchKernel.argtypes = [
            ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self.lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        self.lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        self.lib.cuStreamCreateWithPriority.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_int]
        self.lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        self.lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        self.lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(text))
            raise TallyError(f"{what} failed: {text.value.decode() if text.value else rc}")

    def arch(self, device: ctypes.c_int) -> str:
        """sm_XY of a device handle (cuDeviceGet's)."""
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
        self.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
        return f"sm_{major.value}{minor.value}"

    def __getattr__(self, name):
        function = getattr(self.lib, name)

        def call(*args):
            self.check(function(*args), name)

        return call


class MicroKernels:
    """Context, module, stream and scratch buffer; launches `work` and synchronizes."""

    def __init__(self, high_priority: bool, image: str = "cubin"):
        if image not in IMAGE_KINDS:
            raise TallyError(f"micro workloads: image must be one of {', '.join(IMAGE_KINDS)}, not {image!r}")
        drv = self.drv = Driver()
        drv.cuInit(0)
        device = ctypes.c_int()
        drv.cuDeviceGet(ctypes.byref(device), 0)
        self.arch = drv.arch(device)
        self.context = ctypes.c_void_p()
        # the primary context: the one the runtime API (and a co-resident PyTorch) would use too
        drv.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device)
        drv.cuCtxSetCurrent(self.context)
        if image == "ptx":
            # the virtual architecture: NVRTC writes PTX, and the driver JITs it at load
            code, self.image_kind = compile_kernel("compute_" + self.arch[len("sm_"):])
        else:
            code, self.image_kind = compile_kernel(self.arch)
        self.module = ctypes.c_void_p()
        rc = drv.lib.cuModuleLoadData(ctypes.byref(self.module), code)
        if rc == CUDA_ERROR_UNSUPPORTED_PTX_VERSION and self.image_kind == "ptx":
            version = ctypes.c_int()
            ok = drv.lib.cuDriverGetVersion(ctypes.byref(version)) == 0
            raise TallyError(unsupported_ptx_message(code, version.value if ok else None))
        drv.check(rc, "cuModuleLoadData")
        self.function = ctypes.c_void_p()
        drv.cuModuleGetFunction(ctypes.byref(self.function), self.module, b"work")
        least, greatest = ctypes.c_int(), ctypes.c_int()
        drv.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest))
        self.priority = greatest.value if high_priority else 0
        self.stream = ctypes.c_void_p()
        drv.cuStreamCreateWithPriority(ctypes.byref(self.stream), CU_STREAM_NON_BLOCKING, self.priority)
        self.buffer = ctypes.c_uint64()
        drv.cuMemAlloc_v2(ctypes.byref(self.buffer), 1 << 20)
        self._iters = ctypes.c_int(0)
        # kernelParams: an array of pointers to each argument's value
        self._params = (ctypes.c_void_p * 2)(ctypes.cast(ctypes.byref(self.buffer), ctypes.c_void_p),
                                             ctypes.cast(ctypes.byref(self._iters), ctypes.c_void_p))

    def launch(self, blocks: int, threads: int, iters: int) -> None:
        self._iters.value = iters  # the driver copies parameter values at launch
        self.drv.cuLaunchKernel(self.function, blocks, 1, 1, threads, 1, 1, 0, self.stream, self._params, None)

    def synchronize(self) -> None:
        self.drv.cuStreamSynchronize(self.stream)


class MicroWorkload:
    def __init__(self, name: str, kernels: int, blocks: int, threads: int, iters: int, high_priority: bool,
                 image: str = "cubin"):
        self.name, self.kernels, self.blocks, self.threads, self.iters = name, kernels, blocks, threads, iters
        self.gpu = MicroKernels(high_priority, image)

    def step(self) -> None:
        for _ in range(self.kernels):
            self.gpu.launch(self.blocks, self.threads, self.iters)
        self.gpu.synchronize()

    def info(self) -> dict:
        return {"device": f"CUDA driver API ({self.gpu.arch}, {self.gpu.image_kind})", "kernels": self.kernels,
                "grid": self.blocks, "block": self.threads, "iters": self.iters, "stream_priority": self.gpu.priority}


def micro_hp(spec, variant, options):
    d = spec.details
    return MicroWorkload(spec.name, int(options.get("kernels", d["kernels"])), int(options.get("blocks", d["blocks"])),
                         int(options.get("threads", d["threads"])), int(options.get("iters", d["iters"])),
                         os.environ.get(HP_STREAM_PRIORITY_ENV) == "high", str(options.get("image", "cubin")))


def micro_be(spec, variant, options):
    """micro-be, micro-be-ptx and micro-be-short: the spec's details say the shape and the image kind."""
    d = spec.details
    return MicroWorkload(spec.name, int(options.get("kernels", d["kernels_per_step"])),
                         int(options.get("blocks", d["blocks"])), int(options.get("threads", d["threads"])),
                         int(options.get("iters", d["iters"])), False, str(options.get("image", d.get("image", "cubin"))))


def device_arch(device: int = 0) -> str:
    """sm_XY of a CUDA device, from the driver (cuDeviceGetAttribute); TallyError without one."""
    drv = Driver()
    drv.cuInit(0)
    handle = ctypes.c_int()
    drv.cuDeviceGet(ctypes.byref(handle), device)
    return drv.arch(handle)
