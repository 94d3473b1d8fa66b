"""The per-GPU scoreboard: one shared-memory file that the daemon and every
agent on that GPU map.

The layout is defined once, here, as field lists with explicit offsets. The C
header the agent compiles against (agent/scoreboard.h) is generated from these
lists by `python -m tally.scoreboard_codegen`, and a test checks the checked-in
header against the generator, so C and Python cannot drift.

Concurrency model (x86-64, little-endian, every field naturally aligned so an
aligned load/store of it is single-copy atomic):

- The agent claims a slot with a compare-and-swap of `state` 0 -> 1 and then
  fills in pid, priority, comm. Everything else in the slot is written only by
  its owner (counters, lanes' launched_seq) or by the GPU (lanes' completed_seq).
- The daemon is the registry: it scans slots, repairs slots whose process died,
  and writes the header's daemon fields (heartbeat, hp_active, epoch).
- The SLO area after the slots holds one request-latency record per slot,
  written only by the slot's owner process (tally.slo) and zeroed at claim
  and release; the daemon reads it without locks.
- Readers count in-flight work only in slots whose state is ACTIVE; a slot
  under repair is ignored, which is what unblocks everyone the moment the
  daemon marks it.

Python has no native CAS. Python-side claims (tests, fake clients) use
libatomic's `__atomic_compare_exchange_4`, which is the same lock cmpxchg the
agent's `__atomic_compare_exchange_n` compiles to, so Python and C claimers
exclude each other. Without libatomic, claims fall back to an flock on the file,
which excludes other Python claimers only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import math
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tally.errors import TallyError

# ---------------------------------------------------------------------------
# Constants shared with C (all emitted into agent/scoreboard.h)

MAGIC = int.from_bytes(b"TALLYSCB", "little")
# Bump on any layout change; the agent refuses a scoreboard of another version.
VERSION = 5
MAX_CLIENTS = 64
MAX_LANES = 16
CACHE_LINE = 64
# The file is sized to whole pages so the agent can cuMemHostRegister the
# mapping as it is (registration works on page-aligned ranges).
PAGE_SIZE = 4096
GPU_UUID_LEN = 48
COMM_LEN = 16

SLOT_FREE = 0
SLOT_ACTIVE = 1
SLOT_REPAIRING = 2
SLOT_STATE_NAMES = {SLOT_FREE: "free", SLOT_ACTIVE: "active", SLOT_REPAIRING: "repairing"}

PRIORITY_HIGH = 0
PRIORITY_BEST_EFFORT = 1
PRIORITY_NAMES = {PRIORITY_HIGH: "high", PRIORITY_BEST_EFFORT: "best-effort"}

POLICY_PASSTHROUGH = 0
POLICY_TALLY = 1
POLICY_TGS = 2  # TGS-style adaptive rate control of BE launches (agent/gate.h, tally.daemon.tgs)
POLICY_NAMES = {POLICY_PASSTHROUGH: "passthrough", POLICY_TALLY: "tally", POLICY_TGS: "tgs"}

# SLO mode (tally.daemon.slo): what the controller did at its last step
SLO_STATE_OFF = 0       # no active HP client with an SLO: the configured budget applies
SLO_STATE_WARMUP = 1    # too few HP latencies measured since the last change to judge
SLO_STATE_INCREASE = 2  # p99 < margin x SLO: budget increased
SLO_STATE_HOLD = 3      # margin x SLO <= p99 <= SLO (or waiting for the next interval)
SLO_STATE_DECREASE = 4  # p99 > SLO: budget decreased
SLO_STATE_FLOOR = 5     # p99 > SLO with the budget already at its floor
SLO_STATE_NAMES = {SLO_STATE_OFF: "off", SLO_STATE_WARMUP: "warmup", SLO_STATE_INCREASE: "increase",
                   SLO_STATE_HOLD: "hold", SLO_STATE_DECREASE: "decrease", SLO_STATE_FLOOR: "floor"}

# Request-latency histograms (one per slot, in the SLO area after the slots):
# log-bucketed, SLO_HIST_PER_OCTAVE buckets per power of two. Bucket 0 holds
# latencies below 2**SLO_HIST_MIN_LOG2 ns (8.2 us); bucket i in 1..N-2 holds
# [2**(MIN_LOG2 + (i-1)/P), 2**(MIN_LOG2 + i/P)) ns; the last bucket everything
# from 2**(MIN_LOG2 + (N-2)/P) ns (68.7 s) up.
SLO_HIST_BUCKETS = 94
SLO_HIST_PER_OCTAVE = 4
SLO_HIST_MIN_LOG2 = 13

# A BE slot's gpu_gate word (the GPU-side gate, agent/gpugate.c): BE launches wait on the GPU
# until its top bit is set; HP launches close it by storing their time (top bit clear).
GPU_GATE_OPEN = 1 << 63
GPU_GATE_DISABLED = GPU_GATE_OPEN | 1  # open for good: the process stopped using the gate

# How long the agent holds a BE launch while what it waits for makes no progress before the
# process fails open (TALLY_MAX_HOLD_MS overrides it per client). An HP client that sits idle
# makes none, so an idle window this long or longer would fail every BE client open.
AGENT_MAX_HOLD_NS = 10_000_000_000


def gpu_gate_state(word: int, in_use: bool) -> str | None:
    """A slot's GPU-side gate as `tally status` shows it; None when its process does not use it."""
    if word == GPU_GATE_DISABLED:
        return "disabled"
    if not in_use:
        return None
    return "open" if word & GPU_GATE_OPEN else "closed"


SCOREBOARD_NAME_PREFIX = "tally-"
DEFAULT_SHM_DIR = "/dev/shm"

# ---------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Field:
    offset: int
    name: str
    ctype: str  # "u32", "u64", "char" (with count), or a struct name (with count)
    count: int  # 1 for scalars; array length otherwise
    writer: str  # who stores to it: daemon, agent (the slot's owner), gpu, any agent
    doc: str

    @property
    def elem_size(self) -> int:
        return _elem_size(self.ctype)

    @property
    def size(self) -> int:
        return self.elem_size * self.count

    @property
    def align(self) -> int:
        return _elem_align(self.ctype)


@dataclass(frozen=True)
class Struct:
    name: str  # C struct name
    fields: tuple[Field, ...]
    size: int
    doc: str

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def _elem_size(ctype: str) -> int:
    if ctype in _SCALAR_SIZES:
        return _SCALAR_SIZES[ctype]
    return _STRUCTS[ctype].size


def _elem_align(ctype: str) -> int:
    if ctype in _SCALAR_SIZES:
        return _SCALAR_SIZES[ctype]
    return max(f.align for f in _STRUCTS[ctype].fields)


_SCALAR_SIZES = {"u32": 4, "u64": 8, "char": 1}
_STRUCTS: dict[str, Struct] = {}


def _struct(name: str, size: int, doc: str, rows: list[tuple]) -> Struct:
    """Builds a Struct from (offset, name, ctype, count, writer, doc) rows and
    checks that the written offsets are what natural alignment gives, or a
    deliberate jump to a cache-line boundary (so hot fields written by
    different parties do not share a line)."""
    fields = tuple(Field(*row) for row in rows)
    pos = 0
    for f in fields:
        assert f.offset % f.align == 0, f"{name}.{f.name}: offset {f.offset} not {f.align}-aligned"
        if f.offset != pos:
            assert f.offset > pos, f"{name}.{f.name}: offset {f.offset} overlaps the previous field (ends at {pos})"
            assert f.offset % CACHE_LINE == 0, (
                f"{name}.{f.name}: gap before offset {f.offset} that is not a jump to a cache line")
        pos = f.offset + f.size
    assert pos <= size, f"{name}: fields end at {pos}, past the size {size}"
    struct = Struct(name, fields, size, doc)
    _STRUCTS[name] = struct
    return struct


LANE = _struct("tally_sb_lane", 16, "One stream's in-flight window: launched - completed kernels not yet done.", [
    (0, "launched_seq", "u64", 1, "agent",
     "sequence number of the last work launched on this lane (CPU, at launch)"),
    (8, "completed_seq", "u64", 1, "gpu",
     "sequence number of the last work completed (GPU, stream memory op into host-mapped memory)"),
])

HEADER = _struct("tally_sb_header", 384, "Scoreboard header: identity, policy, daemon liveness.", [
    # line 0-1: written once at creation or rarely by the daemon; read by every agent
    (0, "magic", "u64", 1, "daemon", "TALLY_SB_MAGIC; written last at creation"),
    (8, "version", "u32", 1, "daemon", "TALLY_SB_VERSION"),
    (12, "header_size", "u32", 1, "daemon", "sizeof(struct tally_sb_header); slot 0 starts here"),
    (16, "slot_size", "u32", 1, "daemon", "sizeof(struct tally_sb_slot)"),
    (20, "max_clients", "u32", 1, "daemon", "number of slots"),
    (24, "max_lanes", "u32", 1, "daemon", "lanes per slot"),
    (28, "daemon_pid", "u32", 1, "daemon", "pid of the daemon that owns this scoreboard"),
    (32, "gpu_uuid", "char", GPU_UUID_LEN, "daemon",
     "NUL-terminated, as NVML prints it: \"GPU-\" + 8-4-4-4-12 lowercase hex"),
    (80, "total_size", "u64", 1, "daemon", "file size in bytes (whole pages)"),
    (88, "daemon_timeout_ns", "u64", 1, "daemon",
     "heartbeat older than this means the daemon is dead: agents fail open"),
    (96, "idle_window_ns", "u64", 1, "daemon", "HP must be idle this long before BE launches"),
    (104, "turnaround_budget_ns", "u64", 1, "daemon",
     "largest estimated BE kernel time admitted while HP may need the GPU"),
    (112, "unthrottle_after_ns", "u64", 1, "daemon", "HP idle this long: BE runs ungated"),
    (120, "policy", "u32", 1, "daemon", "TALLY_SB_POLICY_*"),
    # line 2: written by the daemon every tick
    (128, "daemon_heartbeat_ns", "u64", 1, "daemon",
     "CLOCK_MONOTONIC ns of the daemon's last tick (~10 ms); 0 = daemon stopped"),
    (136, "epoch", "u64", 1, "daemon", "bumped on every slot repair"),
    (144, "daemon_start_ns", "u64", 1, "daemon", "CLOCK_MONOTONIC ns when the daemon created the scoreboard"),
    (152, "hp_active", "u32", 1, "daemon", "number of ACTIVE high-priority slots"),
    (156, "be_active", "u32", 1, "daemon", "number of ACTIVE best-effort slots"),
    (160, "be_rate_limit_per_s", "u64", 1, "daemon",
     "policy tgs: kernel launches per second each BE client may issue (token bucket); 0 = unlimited"),
    (168, "be_rate_burst", "u64", 1, "daemon",
     "policy tgs: token bucket depth, launches a BE client may issue back to back (0 = 1)"),
    (176, "hp_rate_per_s", "u64", 1, "daemon",
     "policy tgs (monitoring): HP completed launches per second over the controller's last window"),
    (184, "hp_standalone_rate_per_s", "u64", 1, "daemon",
     "policy tgs (monitoring): the HP rate the controller learned with BE throttled or absent (0 = not yet)"),
    # line 3: stored by HP agents on every launch; alone on its line so those
    # stores do not invalidate the line BE agents read the policy from
    (192, "hp_last_launch_ns", "u64", 1, "any agent",
     "CLOCK_MONOTONIC ns of an HP launch (relaxed store; not a strict max)"),

    # line 4: stored by waiting BE agents (and the daemon's tick) while HP work is in
    # flight; read by BE agents. Off line 3 so HP launches never miss on it.
    (256, "hp_last_busy_ns", "u64", 1, "BE agents/daemon",
     "CLOCK_MONOTONIC ns at which HP work was last seen in flight (relaxed store; not a strict max)"),
    # line 5: written by BE agents when they start or stop using the GPU-side gate; read by HP
    # agents on every launch (a line that rarely changes stays in their caches)
    (320, "gpu_gate_slots", "u64", 1, "BE agents",
     "bit i: slot i's BE process uses the GPU-side gate (TALLY_GPU_GATE=1): HP launches close its gpu_gate"),
])

SLOT = _struct("tally_sb_slot", 448, "One client process.", [
    # line 0: identity and the owner's counters
    (0, "state", "u32", 1, "agent/daemon", "TALLY_SB_SLOT_*; claimed by CAS 0 -> 1"),
    (4, "priority", "u32", 1, "agent", "TALLY_SB_PRIO_*"),
    (8, "pid", "u32", 1, "agent", "owner's pid (0 while the claim is being filled in)"),
    (12, "failopen", "u32", 1, "agent", "nonzero once the agent failed open"),
    (16, "launches", "u64", 1, "agent", "kernel launches seen"),
    (24, "graph_launches", "u64", 1, "agent", "graph launches seen"),
    (32, "last_launch_ns", "u64", 1, "agent",
     "CLOCK_MONOTONIC ns of the last launch (BE with nobody to protect: at the clock's tick)"),
    (40, "held_ns", "u64", 1, "agent",
     "BE: time spent held at the gate (GPU-side gate: launches waiting behind the closed word)"),
    (48, "held_launches", "u64", 1, "agent", "BE: launches that were held (GPU-side gate: enqueued while closed)"),
    (56, "long_kernels", "u64", 1, "agent", "BE: kernels admitted alone because their estimate exceeded the budget"),
    # line 1: identity written once at claim
    (64, "comm", "char", COMM_LEN, "agent", "process name, NUL-terminated"),
    (80, "claim_ns", "u64", 1, "agent", "CLOCK_MONOTONIC ns of the claim"),
    (88, "pid_start_ticks", "u64", 1, "agent",
     "field 22 of /proc/self/stat (0 = not given); lets the daemon tell a reused pid"),
    (96, "slo_p99_ns", "u64", 1, "agent",
     "HP: the p99 latency target (TALLY_SLO_P99_MS), set at claim; 0 = none"),
    (104, "busy_start_ns", "u64", 1, "agent",
     "HP: CLOCK_MONOTONIC ns of the first launch of the current busy period (the SLO proxy)"),
    (112, "busy_periods", "u64", 1, "agent",
     "HP: busy periods started (a launch with nothing in flight after > idle_window_ns without launches)"),
    (120, "sliced_launches", "u64", 1, "agent",
     "BE: launches run as slices of a transformed kernel (block-level scheduling)"),
    # lines 2-5
    (128, "lanes", "tally_sb_lane", MAX_LANES, "agent/gpu", "per-stream sequence numbers"),
    # line 6: a BE slot's gate word, which the GPU polls over PCIe while BE streams wait on it;
    # an HP slot's launches in progress (a slot is one or the other, so the line is never both)
    (384, "gpu_gate", "u64", 1, "HP agents/BE agent",
     "BE, GPU-side gate: top bit set = open (BE launches wait on the GPU for it); an HP launch closes it "
     "by storing its time; the owner opens it once HP is idle, for good when it stops using the gate"),
    (392, "launching", "u32", 1, "agent",
     "HP: launch API calls between enter and exit, whose work is in flight before any lane shows it"),
])

SLO_STATUS = _struct("tally_sb_slo_status", 64, "SLO mode's state, at the start of the SLO area "
                     "(read by status and metrics; BE agents read slo_state: the GPU-side gate steps aside in SLO mode).", [
    (0, "slo_target_ns", "u64", 1, "daemon",
     "policy tally, SLO mode: p99 target of the HP client the controller is holding to (0 = SLO mode off, "
     "or none judged yet: warm-up)"),
    (8, "slo_p99_ns", "u64", 1, "daemon",
     "SLO mode: that client's p99 latency over the controller's window (0 = not measured yet)"),
    (16, "slo_state", "u32", 1, "daemon", "SLO mode: TALLY_SB_SLO_STATE_* of the controller's last step"),
])

SLO = _struct("tally_sb_slo", 768, "One slot's request latencies, reported by its HP program (tally.slo).", [
    (0, "req_count", "u64", 1, "owner process", "requests reported since the claim"),
    (8, "req_sum_ns", "u64", 1, "owner process", "sum of their latencies"),
    (16, "req_hist", "u64", SLO_HIST_BUCKETS, "owner process",
     "cumulative count per latency bucket (TALLY_SB_SLO_HIST_*)"),
])

HEADER_SIZE = HEADER.size
SLOT_SIZE = SLOT.size
SLO_SIZE = SLO.size
assert HEADER_SIZE % CACHE_LINE == 0 and SLOT_SIZE % CACHE_LINE == 0
assert SLOT.field("lanes").offset % CACHE_LINE == 0
assert SLOT.field("lanes").count == MAX_LANES and LANE.size == 16


def slot_offset(index: int) -> int:
    return HEADER_SIZE + index * SLOT_SIZE


def lane_offset(slot: int, lane: int) -> int:
    return slot_offset(slot) + SLOT.field("lanes").offset + lane * LANE.size


# The SLO area, after the slots: struct tally_sb_slo_status, then one struct
# tally_sb_slo per slot.
SLO_AREA_OFFSET = slot_offset(MAX_CLIENTS)
SLO_RECORDS_OFFSET = SLO_AREA_OFFSET + SLO_STATUS.size
assert SLO_AREA_OFFSET % CACHE_LINE == 0 and SLO_SIZE % CACHE_LINE == 0 and SLO_STATUS.size % CACHE_LINE == 0


def slo_offset(index: int) -> int:
    return SLO_RECORDS_OFFSET + index * SLO_SIZE


TOTAL_SIZE = -(-slo_offset(MAX_CLIENTS) // PAGE_SIZE) * PAGE_SIZE


def slo_bucket(latency_ns: int) -> int:
    """The request-latency histogram bucket of a latency (see SLO_HIST_BUCKETS)."""
    if latency_ns < (1 << SLO_HIST_MIN_LOG2):
        return 0
    # exact on powers of two: bucket boundaries at 2**(k/P)
    i = 1 + int(math.floor((math.log2(latency_ns) - SLO_HIST_MIN_LOG2) * SLO_HIST_PER_OCTAVE + 1e-9))
    return min(i, SLO_HIST_BUCKETS - 1)


def slo_bucket_bounds(i: int) -> tuple[float, float]:
    """[low, high) of bucket i in ns; the last bucket's high is its low (unbounded above)."""
    if i <= 0:
        return 0.0, float(1 << SLO_HIST_MIN_LOG2)
    low = 2.0 ** (SLO_HIST_MIN_LOG2 + (i - 1) / SLO_HIST_PER_OCTAVE)
    if i >= SLO_HIST_BUCKETS - 1:
        return low, low
    return low, 2.0 ** (SLO_HIST_MIN_LOG2 + i / SLO_HIST_PER_OCTAVE)


def hist_quantile(counts, q: float) -> float:
    """The q-quantile (0 < q <= 1) of latencies in ns from per-bucket counts,
    interpolated geometrically inside its bucket; 0.0 for no counts."""
    n = sum(counts)
    if n <= 0:
        return 0.0
    rank = max(1, math.ceil(q * n - 1e-9))
    seen = 0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if seen + c >= rank:
            low, high = slo_bucket_bounds(i)
            frac = (rank - seen) / c
            if i == 0:
                return high * frac
            return low * (high / low) ** frac
        seen += c
    return slo_bucket_bounds(len(counts) - 1)[0]


def ctypes_struct(struct: Struct) -> type[ctypes.Structure]:
    """A ctypes.Structure with the same fields and explicit padding; used to
    cross-check the offsets against the platform's own layout rules."""
    mapping = {"u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "char": ctypes.c_char}
    cfields = []
    pos = 0
    for f in struct.fields:
        if f.offset > pos:
            cfields.append((f"_pad{pos}", ctypes.c_uint8 * (f.offset - pos)))
        base = mapping[f.ctype] if f.ctype in mapping else ctypes_struct(_STRUCTS[f.ctype])
        cfields.append((f.name, base * f.count if f.count > 1 or f.ctype == "char" else base))
        pos = f.offset + f.size
    if struct.size > pos:
        cfields.append((f"_pad{pos}", ctypes.c_uint8 * (struct.size - pos)))
    return type(struct.name, (ctypes.Structure,), {"_fields_": cfields})


# ---------------------------------------------------------------------------
# Naming


def shm_dir() -> Path:
    return Path(os.environ.get("TALLY_SHM_DIR") or DEFAULT_SHM_DIR)


def scoreboard_prefix(uid: int | None = None, directory: Path | None = None) -> str:
    """Everything of a scoreboard's path but the GPU UUID; the agent appends
    the UUID of its device to this (given to it as TALLY_SCOREBOARD_PREFIX)."""
    uid = os.getuid() if uid is None else uid
    directory = shm_dir() if directory is None else directory
    return f"{directory}/{SCOREBOARD_NAME_PREFIX}{uid}-"


def scoreboard_path(gpu_uuid: str, uid: int | None = None, directory: Path | None = None) -> Path:
    return Path(scoreboard_prefix(uid, directory) + gpu_uuid)


# ---------------------------------------------------------------------------
# Policy parameters


@dataclass
class PolicyParams:
    policy: int = POLICY_TALLY
    idle_window_ns: int = 100_000
    turnaround_budget_ns: int = 100_000
    unthrottle_after_ns: int = 100_000_000
    daemon_timeout_ns: int = 500_000_000
    be_rate_burst: int = 16  # policy tgs: BE token bucket depth (launches)


# ---------------------------------------------------------------------------
# libatomic CAS


class _LibAtomic:
    def __init__(self, lib: ctypes.CDLL):
        # getattr: a literal dunder attribute would be name-mangled inside the class
        self.cas4 = getattr(lib, "__atomic_compare_exchange_4")
        self.cas4.restype = ctypes.c_bool
        self.cas4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int]

    def compare_exchange_u32(self, address: int, expected: int, desired: int) -> bool:
        seq_cst = 5
        exp = ctypes.c_uint32(expected)
        return self.cas4(address, ctypes.addressof(exp), desired, seq_cst, seq_cst)


def _load_libatomic() -> _LibAtomic | None:
    if os.environ.get("TALLY_SCOREBOARD_NO_LIBATOMIC"):
        return None
    for name in (ctypes.util.find_library("atomic"), "libatomic.so.1"):
        if not name:
            continue
        try:
            return _LibAtomic(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


_libatomic: _LibAtomic | None | bool = False  # False: not looked up yet


def _atomics() -> _LibAtomic | None:
    global _libatomic
    if _libatomic is False:
        _libatomic = _load_libatomic()
    return _libatomic  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The mapping


class _FieldAccessor:
    """Reads and writes one header field of the mapped scoreboard."""

    def __init__(self, field: Field, base: int = 0):
        self.field = field
        self.base = base

    def __get__(self, sb, owner=None):
        if sb is None:
            return self
        return sb._read(self.field, self.base)

    def __set__(self, sb, value):
        sb._write(self.field, self.base, value)


class Scoreboard:
    """A mapped scoreboard file. Create it (daemon) or open it (everyone else)."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap):
        self.path = Path(path)
        self._fd = fd
        self._mm = mm
        view = memoryview(mm)
        self._u32 = view.cast("I")
        self._u64 = view.cast("Q")
        self._bytes = view
        self._cbuf = None

    # --- lifecycle -----------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, gpu_uuid: str, params: PolicyParams | None = None,
               daemon_pid: int | None = None) -> "Scoreboard":
        """Creates (or replaces) the scoreboard at `path`. The file is filled in
        under a temporary name and renamed into place, magic written last, so
        an agent opening the name never sees a half-initialized scoreboard."""
        path = Path(path)
        params = params or PolicyParams()
        encoded_uuid = gpu_uuid.encode()
        if not encoded_uuid or len(encoded_uuid) >= GPU_UUID_LEN:
            raise TallyError(f"GPU UUID {gpu_uuid!r} does not fit the scoreboard ({GPU_UUID_LEN - 1} bytes at most)")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            raise TallyError(f"cannot create scoreboard {path}: directory {path.parent} does not exist") from None
        except OSError as exc:
            raise TallyError(f"cannot create scoreboard {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # the umask must not widen or narrow it
            os.ftruncate(fd, TOTAL_SIZE)
            mm = mmap.mmap(fd, TOTAL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise TallyError(f"cannot create scoreboard {path}: {exc.strerror}") from None
        sb = cls(path, fd, mm)
        h = HEADER.field
        sb._write(h("version"), 0, VERSION)
        sb._write(h("header_size"), 0, HEADER_SIZE)
        sb._write(h("slot_size"), 0, SLOT_SIZE)
        sb._write(h("max_clients"), 0, MAX_CLIENTS)
        sb._write(h("max_lanes"), 0, MAX_LANES)
        sb._write(h("daemon_pid"), 0, os.getpid() if daemon_pid is None else daemon_pid)
        sb._write(h("gpu_uuid"), 0, gpu_uuid)
        sb._write(h("total_size"), 0, TOTAL_SIZE)
        sb.set_params(params)
        now = time.monotonic_ns()
        sb._write(h("daemon_start_ns"), 0, now)
        sb._write(h("daemon_heartbeat_ns"), 0, now)
        sb._write(h("magic"), 0, MAGIC)
        os.rename(tmp, path)
        return sb

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Scoreboard":
        """Maps an existing scoreboard after checking that it is one, of this
        version and size; anything else is a one-line TallyError."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise TallyError(f"no scoreboard at {path}") from None
        except OSError as exc:
            raise TallyError(f"cannot open scoreboard {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise TallyError(f"{path} is not a tally scoreboard: {size} bytes, shorter than its header")
            header = os.pread(fd, HEADER_SIZE, 0)
            magic = int.from_bytes(header[0:8], "little")
            if magic != MAGIC:
                raise TallyError(f"{path} is not a tally scoreboard (magic {magic:#018x})")
            version = int.from_bytes(header[8:12], "little")
            if version != VERSION:
                raise TallyError(f"scoreboard {path} has layout version {version}; this tally uses {VERSION}: "
                                 "restart the daemon with this tally (`tally down && tally up`)")
            geometry = {f: int.from_bytes(header[HEADER.field(f).offset:HEADER.field(f).offset + 4], "little")
                        for f in ("header_size", "slot_size", "max_clients", "max_lanes")}
            expected = {"header_size": HEADER_SIZE, "slot_size": SLOT_SIZE,
                        "max_clients": MAX_CLIENTS, "max_lanes": MAX_LANES}
            if geometry != expected:
                bad = ", ".join(f"{k}={geometry[k]} (want {expected[k]})" for k in expected if geometry[k] != expected[k])
                raise TallyError(f"scoreboard {path} is corrupt: {bad}")
            total = int.from_bytes(header[80:88], "little")
            if total != TOTAL_SIZE or size != TOTAL_SIZE:
                raise TallyError(f"scoreboard {path} is corrupt: file is {size} bytes, header says {total}, "
                                 f"want {TOTAL_SIZE}")
            mm = mmap.mmap(fd, TOTAL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm)

    def close(self) -> None:
        if self._mm is None:
            return
        self._cbuf = None
        for view in (self._u32, self._u64, self._bytes):
            view.release()
        self._mm.close()
        os.close(self._fd)
        self._mm = None

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Scoreboard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- raw field access ------------------------------------------------

    def _read(self, field: Field, base: int):
        off = base + field.offset
        if field.ctype == "u64":
            return self._u64[off // 8]
        if field.ctype == "u32":
            return self._u32[off // 4]
        if field.ctype == "char":
            raw = bytes(self._bytes[off:off + field.count])
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        raise TypeError(f"{field.name} is not a scalar field")

    def _write(self, field: Field, base: int, value) -> None:
        off = base + field.offset
        if field.ctype == "u64":
            self._u64[off // 8] = value
        elif field.ctype == "u32":
            self._u32[off // 4] = value
        elif field.ctype == "char":
            raw = value.encode() if isinstance(value, str) else bytes(value)
            raw = raw[:field.count - 1]
            self._bytes[off:off + field.count] = raw + b"\0" * (field.count - len(raw))
        else:
            raise TypeError(f"{field.name} is not a scalar field")

    # --- header ----------------------------------------------------------

    def header(self) -> dict:
        return {f.name: self._read(f, 0) for f in HEADER.fields}

    def params(self) -> PolicyParams:
        return PolicyParams(**{name: getattr(self, name) for name in PolicyParams.__dataclass_fields__})

    def set_params(self, params: PolicyParams) -> None:
        for name in PolicyParams.__dataclass_fields__:
            setattr(self, name, getattr(params, name))

    def heartbeat(self, now_ns: int | None = None) -> int:
        now = time.monotonic_ns() if now_ns is None else now_ns
        self.daemon_heartbeat_ns = now
        return now

    def daemon_alive(self, now_ns: int | None = None) -> bool:
        """The agent's test: a heartbeat within daemon_timeout_ns (0 = stopped)."""
        beat = self.daemon_heartbeat_ns
        now = time.monotonic_ns() if now_ns is None else now_ns
        return beat != 0 and now - beat <= self.daemon_timeout_ns

    # --- slots -----------------------------------------------------------

    def _check_slot(self, index: int) -> int:
        if not 0 <= index < MAX_CLIENTS:
            raise IndexError(f"slot {index} out of range 0..{MAX_CLIENTS - 1}")
        return slot_offset(index)

    def slot_get(self, index: int, name: str):
        return self._read(SLOT.field(name), self._check_slot(index))

    def slot_set(self, index: int, name: str, value) -> None:
        self._write(SLOT.field(name), self._check_slot(index), value)

    def slot_state(self, index: int) -> int:
        return self._u32[self._check_slot(index) // 4]

    def _address(self, offset: int) -> int:
        if self._cbuf is None:
            self._cbuf = (ctypes.c_char * TOTAL_SIZE).from_buffer(self._mm)
        return ctypes.addressof(self._cbuf) + offset

    def _try_claim_state(self, index: int) -> bool:
        base = slot_offset(index)
        atomics = _atomics()
        if atomics is not None:
            return atomics.compare_exchange_u32(self._address(base), SLOT_FREE, SLOT_ACTIVE)
        # flock fallback: excludes other Python claimers only (see module doc)
        if self._u32[base // 4] != SLOT_FREE:
            return False
        self._u32[base // 4] = SLOT_ACTIVE
        return True

    def claim_slot(self, pid: int, priority: int, comm: str = "", pid_start_ticks: int = 0,
                   slo_p99_ns: int = 0) -> int:
        """Claims the first free slot, as the agent does; returns its index."""
        if priority not in PRIORITY_NAMES:
            raise ValueError(f"priority {priority} is not one of {sorted(PRIORITY_NAMES)}")
        locked = _atomics() is None
        if locked:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for index in range(MAX_CLIENTS):
                if self.slot_state(index) == SLOT_FREE and self._try_claim_state(index):
                    base = slot_offset(index)
                    self._clear_slot_body(base)
                    self._write(SLOT.field("priority"), base, priority)
                    self._write(SLOT.field("comm"), base, comm)
                    self._write(SLOT.field("claim_ns"), base, time.monotonic_ns())
                    self._write(SLOT.field("pid_start_ticks"), base, pid_start_ticks)
                    self._write(SLOT.field("slo_p99_ns"), base, slo_p99_ns)
                    # pid last: a nonzero pid tells the daemon the claim is complete
                    self._write(SLOT.field("pid"), base, pid)
                    return index
        finally:
            if locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        raise TallyError(f"scoreboard {self.path} is full: {MAX_CLIENTS} clients on this GPU")

    def _clear_slot_body(self, base: int) -> None:
        # everything after `state`, which stays as the claimer or repairer set it
        self._bytes[base + 4:base + SLOT_SIZE] = bytes(SLOT_SIZE - 4)
        index = (base - HEADER_SIZE) // SLOT_SIZE
        self._bytes[slo_offset(index):slo_offset(index) + SLO_SIZE] = bytes(SLO_SIZE)

    def release_slot(self, index: int) -> None:
        """A clean exit (or the daemon freeing a repaired slot): zero the slot,
        then mark it free."""
        base = self._check_slot(index)
        self._clear_slot_body(base)
        self._u32[base // 4] = SLOT_FREE

    def repair_slot(self, index: int) -> None:
        """The owner died: complete every lane so no one waits on work that
        will never be reported, mark the slot REPAIRING (readers stop counting
        it; whoever sees that state also sees the lanes completed), and bump
        the epoch. The slot stays REPAIRING until release_slot, so a late
        completion write from the dead context cannot land in a new owner's
        lanes."""
        base = self._check_slot(index)
        for lane in range(MAX_LANES):
            off = lane_offset(index, lane)
            self._u64[off // 8 + 1] = self._u64[off // 8]
        self._u32[base // 4] = SLOT_REPAIRING
        self.epoch = self.epoch + 1

    def lane(self, slot: int, lane: int) -> tuple[int, int]:
        """(launched_seq, completed_seq). Completed is read first so that,
        with both only ever growing, the pair never shows completed > launched."""
        self._check_slot(slot)
        if not 0 <= lane < MAX_LANES:
            raise IndexError(f"lane {lane} out of range 0..{MAX_LANES - 1}")
        off = lane_offset(slot, lane) // 8
        completed = self._u64[off + 1]
        launched = self._u64[off]
        return launched, completed

    def set_lane_launched(self, slot: int, lane: int, seq: int) -> None:
        self._check_slot(slot)
        self._u64[lane_offset(slot, lane) // 8] = seq

    def set_lane_completed(self, slot: int, lane: int, seq: int) -> None:
        self._check_slot(slot)
        self._u64[lane_offset(slot, lane) // 8 + 1] = seq

    def in_flight(self, slot: int) -> int:
        """Work launched but not completed, over the slot's lanes."""
        return sum(launched - completed for launched, completed in (self.lane(slot, j) for j in range(MAX_LANES)))

    def busy(self, slot: int) -> bool:
        """Work of the slot on the GPU as the gate counts it (agent/gate.c): in flight on a lane, or
        an (HP) launch call between API enter and exit, whose work no lane shows yet."""
        return self.slot_get(slot, "launching") > 0 or self.in_flight(slot) > 0

    def slots(self) -> Iterator[int]:
        """Indices of slots that are not free."""
        for index in range(MAX_CLIENTS):
            if self._u32[slot_offset(index) // 4] != SLOT_FREE:
                yield index

    def slo_hist(self, index: int) -> tuple[int, ...]:
        """The slot's cumulative request-latency histogram (tally.slo writes it)."""
        self._check_slot(index)
        first = (slo_offset(index) + SLO.field("req_hist").offset) // 8
        return tuple(self._u64[first:first + SLO_HIST_BUCKETS])

    def slo_requests(self, index: int) -> tuple[int, int]:
        """(requests reported, sum of their latencies in ns) of the slot."""
        self._check_slot(index)
        base = slo_offset(index) // 8
        return self._u64[base], self._u64[base + 1]

    def client(self, index: int) -> dict:
        base = self._check_slot(index)
        info = {f.name: self._read(f, base) for f in SLOT.fields if f.name != "lanes"}
        info["slot"] = index
        info["state_name"] = SLOT_STATE_NAMES.get(info["state"], str(info["state"]))
        info["priority_name"] = PRIORITY_NAMES.get(info["priority"], str(info["priority"]))
        info["in_flight"] = self.in_flight(index)
        info["gpu_gate_state"] = gpu_gate_state(info["gpu_gate"], bool(self.gpu_gate_slots >> index & 1))
        info["requests"], info["request_sum_ns"] = self.slo_requests(index)
        return info

    def clients(self) -> list[dict]:
        """Every slot that is not free, as a dict of its fields."""
        return [self.client(i) for i in self.slots()]


for _f in HEADER.fields:
    setattr(Scoreboard, _f.name, _FieldAccessor(_f))
for _f in SLO_STATUS.fields:  # board.slo_state etc., like header fields
    setattr(Scoreboard, _f.name, _FieldAccessor(_f, SLO_AREA_OFFSET))
del _f
