"""`tally up`, `tally down`, `tally status`."""
from __future__ import annotations

import json
import os
import time

import click

from tally import scoreboard as sbmod
from tally.config import POLICIES
from tally.daemon import control
from tally.daemon.daemon import proc_stat
from tally.errors import TallyError

DEFAULTS = control.UpOptions()  # one set of defaults for `tally up` and UpOptions


@click.command("up")
@click.option("--gpus", default=None, metavar="LIST",
              help="GPUs to manage: indices or UUID prefixes, comma-separated (default: all visible).")
@click.option("--mps/--no-mps", default=DEFAULTS.mps, show_default=True,
              help="Start a private MPS control daemon for the clients.")
@click.option("--mps-pipe-dir", type=click.Path(file_okay=False), default=None,
              help="Join an MPS control daemon already running with this pipe directory (not stopped by down).")
@click.option("--mps-log-dir", type=click.Path(file_okay=False), default=None,
              help="That MPS's log directory, passed on to clients.")
@click.option("--policy", type=click.Choice(POLICIES), default=DEFAULTS.policy, show_default=True,
              help="tally: launch-level gate for best-effort work; passthrough: no gating; "
                   "tgs: TGS-style adaptive rate control of best-effort launches (a baseline).")
@click.option("--idle-window-us", type=float, default=DEFAULTS.idle_window_us, show_default=True,
              help="HP must be idle this long before BE launches.")
@click.option("--budget-us", type=float, default=DEFAULTS.budget_us, show_default=True,
              help="Turnaround budget: largest estimated BE kernel admitted while HP may need the GPU.")
@click.option("--unthrottle-ms", type=float, default=DEFAULTS.unthrottle_ms, show_default=True,
              help="After HP has been idle this long, BE work in flight is bounded by the 2 ms idle depth "
                   "instead of the budget.")
@click.option("--daemon-timeout-ms", type=float, default=DEFAULTS.daemon_timeout_ms, show_default=True,
              help="Agents fail open when the daemon's heartbeat is older than this.")
@click.option("--metrics-port", type=int, default=DEFAULTS.metrics_port, show_default=True,
              help="Prometheus metrics on 127.0.0.1:PORT; 0 turns them off.")
@click.option("--log-format", type=click.Choice(("text", "json")), default=DEFAULTS.log_format, show_default=True,
              help="daemon.log as text lines or as JSON objects, one per line (for log shippers).")
@click.option("--foreground", is_flag=True, help="Run the daemon in this process (debugging, systemd).")
def up_command(**options):
    """Start the node daemon: MPS, one scoreboard per GPU, liveness, metrics.

    Defaults come from the config files (/etc/tally/config.toml, then
    ~/.config/tally/config.toml; see docs/operations.md); options given here
    override them.
    """
    ctx = click.get_current_context()
    given = {name for name in options
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    control.up(control.options_from_config(options, given), say=click.echo)


@click.command("down")
@click.option("--force", is_flag=True, help="Stop even while clients still run (they lose MPS and run ungated).")
def down_command(force):
    """Stop the node daemon and everything it started (MPS included)."""
    control.down(force=force, say=click.echo)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or "?"


def _uptime_s(pid: int) -> float | None:
    st = proc_stat(pid)
    if st is None:
        return None
    try:
        with open("/proc/uptime") as f:
            boot_uptime = float(f.read().split()[0])
    except OSError:
        return None
    return boot_uptime - st[1] / os.sysconf("SC_CLK_TCK")


def gpu_memory_by_pid() -> dict[str, dict[int, int]] | None:
    """{GPU UUID: {pid: bytes of device memory}} from NVML's running compute
    processes, or None when NVML (the optional pynvml) cannot say. Under MPS,
    NVML may list the MPS server rather than its clients (driver-dependent),
    so a client can show no figure even where NVML works. Never raises."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no GPU: no figures
        return None
    found: dict[str, dict[int, int]] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            per_pid = found.setdefault(uuid, {})
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = getattr(proc, "usedGpuMemory", None)
                if isinstance(used, int) and used >= 0:
                    per_pid[int(proc.pid)] = per_pid.get(int(proc.pid), 0) + used
    except Exception:  # noqa: BLE001 - a figure is a nicety; status must not fail for it
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return found


def collect_status(state: dict) -> dict:
    now = time.monotonic_ns()
    memory = gpu_memory_by_pid()
    gpus = []
    for gpu in state.get("gpus", []):
        entry = {k: gpu.get(k) for k in ("index", "uuid", "name", "scoreboard")}
        try:
            with sbmod.Scoreboard.open(gpu["scoreboard"]) as board:
                header = board.header()
                entry.update({
                    "policy": sbmod.POLICY_NAMES.get(header["policy"], str(header["policy"])),
                    "hp_active": header["hp_active"], "be_active": header["be_active"],
                    "epoch": header["epoch"],
                    "turnaround_budget_us": header["turnaround_budget_ns"] / 1e3,
                    "slo": {"state": sbmod.SLO_STATE_NAMES.get(board.slo_state, str(board.slo_state)),
                            "target_ms": board.slo_target_ns / 1e6, "p99_ms": board.slo_p99_ns / 1e6},
                    "heartbeat_age_ms": (now - header["daemon_heartbeat_ns"]) / 1e6
                    if header["daemon_heartbeat_ns"] else None,
                    "clients": [{
                        "slot": c["slot"], "state": c["state_name"], "pid": c["pid"],
                        "priority": c["priority_name"], "comm": c["comm"], "command": _command_line(c["pid"]),
                        "launches": c["launches"], "graph_launches": c["graph_launches"],
                        "held_ms": c["held_ns"] / 1e6, "held_launches": c["held_launches"],
                        "long_kernels": c["long_kernels"], "sliced_launches": c["sliced_launches"],
                        "in_flight": c["in_flight"],
                        "failopen": bool(c["failopen"]), "gpu_gate": c["gpu_gate_state"],
                        "slo_p99_ms": c["slo_p99_ns"] / 1e6 if c["slo_p99_ns"] else None,
                        "requests": c["requests"], "busy_periods": c["busy_periods"],
                        "memory_bytes": (memory or {}).get(gpu.get("uuid"), {}).get(c["pid"]),
                    } for c in board.clients()],
                })
        except TallyError as exc:
            entry["error"] = str(exc)
        gpus.append(entry)
    return {
        "daemon": {"pid": state["pid"], "uptime_s": _uptime_s(state["pid"]), "runtime_dir": state.get("runtime_dir"),
                   "log": state.get("log"), "params": state.get("params")},
        "mps": state.get("mps"),
        "metrics": state.get("metrics"),
        "gpus": gpus,
    }


def clients_by_pid(report: dict) -> dict[int, dict]:
    """Every client of a `tally status --json` report, keyed by pid, each with the index and
    UUID of the GPU whose scoreboard holds it (gpu_index, gpu_uuid)."""
    return {c["pid"]: {**c, "gpu_index": gpu.get("index"), "gpu_uuid": gpu.get("uuid")}
            for gpu in report.get("gpus", []) if isinstance(gpu, dict)
            for c in gpu.get("clients", []) if isinstance(c, dict) and isinstance(c.get("pid"), int)}


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status_command(as_json):
    """Show the daemon, its GPUs and its clients."""
    status, state = control.probe()
    if status == "none":
        raise TallyError("no tally daemon is running (start one with `tally up`)")
    if status == "stale":
        pid = (state or {}).get("pid")
        raise TallyError(f"tally daemon{f' pid {pid}' if pid else ''} is not running but left its files: "
                         "`tally down` cleans them up, `tally up` starts a new one")
    if status == "starting":
        raise TallyError("the tally daemon is starting; try again in a moment")
    from tally.daemon.client import version_skew

    error, warning = version_skew(state)
    if error or warning:
        click.echo(f"tally: warning: {error or warning}", err=True)
    report = collect_status(state)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_tables(report)


def _print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    d = report["daemon"]
    uptime = f"{d['uptime_s']:.0f} s" if d["uptime_s"] is not None else "?"
    mps = report["mps"]
    mps_text = (f"{'private' if mps['owned'] else 'external'}, pipe dir {mps['pipe_dir']}" if mps else "off")
    metrics = report["metrics"]["url"] if report["metrics"] else "off"
    params = d["params"] or {}
    console.print(f"tally daemon pid {d['pid']}, up {uptime}; MPS {mps_text}; metrics {metrics}")
    if params:
        console.print(f"policy {sbmod.POLICY_NAMES.get(params['policy'], params['policy'])}: "
                      f"idle window {params['idle_window_ns'] / 1e3:g} us, "
                      f"budget {params['turnaround_budget_ns'] / 1e3:g} us, "
                      f"unthrottle after {params['unthrottle_after_ns'] / 1e6:g} ms")
    for gpu in report["gpus"]:
        title = f"GPU {gpu['index']} {gpu['uuid']} ({gpu['name']})"
        if "error" in gpu:
            console.print(f"{title}: {gpu['error']}")
            continue
        beat = gpu["heartbeat_age_ms"]
        table = Table(title=f"{title}: {gpu['hp_active']} HP, {gpu['be_active']} BE active, "
                            f"heartbeat {f'{beat:.0f} ms ago' if beat is not None else 'stopped'}, "
                            f"epoch {gpu['epoch']}", title_justify="left")
        for column in ("slot", "pid", "priority", "state", "command", "memory", "launches", "held ms",
                       "long kernels", "sliced", "in flight", "GPU gate", "SLO ms", "failopen"):
            table.add_column(column, justify="right" if column not in ("priority", "state", "command") else "left")
        for c in gpu["clients"]:
            table.add_row(str(c["slot"]), str(c["pid"]), c["priority"], c["state"], c["command"][:60],
                          _memory_text(c.get("memory_bytes")), str(c["launches"]), f"{c['held_ms']:.1f}",
                          str(c["long_kernels"]), str(c["sliced_launches"]), str(c["in_flight"]),
                          c.get("gpu_gate") or "",
                          f"{c['slo_p99_ms']:g}" if c.get("slo_p99_ms") else "",
                          "yes" if c["failopen"] else "")
        console.print(table)
        slo = gpu.get("slo") or {}
        if slo.get("state", "off") != "off":
            p99 = f"{slo['p99_ms']:.2f} ms" if slo["p99_ms"] else "not measured yet"
            console.print(f"SLO mode: p99 target {slo['target_ms']:g} ms, observed p99 {p99}, "
                          f"BE budget {gpu['turnaround_budget_us']:g} us ({slo['state']})")


def _memory_text(nbytes: int | None) -> str:
    """Device memory of a client as NVML reports it; "-" where it cannot say."""
    if nbytes is None:
        return "-"
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    return f"{nbytes / (1 << 20):.0f} MiB"
