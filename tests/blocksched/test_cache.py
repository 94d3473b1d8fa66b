"""The on-disk cache of transformed kernels: hits, misses, refusals, versions, corruption."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tally.blocksched import _files, cache as kc
from tally.blocksched.cache import KernelCache, KernelRefused, request_for, transformed_module
from tally.ptx.transform import transform_module

CORPUS = Path(__file__).resolve().parents[1] / "ptx" / "corpus" / "cuda"
PTX = (CORPUS / "elementwise.ptx").read_text()
REFUSED = (CORPUS / "refused.ptx").read_text()


@pytest.fixture(autouse=True)
def fresh_warnings():
    _files.reset_warnings()
    yield
    _files.reset_warnings()


@pytest.fixture
def cache(tmp_path):
    return KernelCache(tmp_path / "kernels")


def warnings_in(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("tally: warning: ")]


def test_miss_then_hit(cache, capsys):
    text, hit = transformed_module(PTX, "saxpy", "preemptible", cache)
    assert not hit and text == transform_module(PTX, "preemptible", ["saxpy"]).text
    assert "saxpy__tally_preemptible" in text
    again, hit = transformed_module(PTX, "saxpy", "preemptible", KernelCache(cache.root))  # a later run
    assert hit and again == text
    # another mode, entry or module is another key
    assert transformed_module(PTX, "saxpy", "slice", cache)[1] is False
    assert transformed_module(PTX, "add_2d", "preemptible", cache)[1] is False
    assert transformed_module(PTX + "\n", "saxpy", "preemptible", cache)[1] is False
    assert (cache.root / "v1" / "INDEX").read_bytes() == kc.INDEX_TEXT
    assert cache.stats()["ok"] == 4 and not warnings_in(capsys)


def test_refusals_are_cached_with_their_reason(cache, monkeypatch):
    with pytest.raises(KernelRefused) as first:
        transformed_module(REFUSED, "grid_sync", "ptb", cache)
    assert not first.value.cache_hit and "grid-wide sync" in first.value.reason
    calls = []
    monkeypatch.setattr(kc, "_transform", lambda *a: calls.append(a))  # a hit must not run tally.ptx
    with pytest.raises(KernelRefused) as second:
        transformed_module(REFUSED, "grid_sync", "ptb", cache)
    assert second.value.cache_hit and second.value.reason == first.value.reason and not calls
    assert cache.stats()["refused"] == 1


@pytest.mark.parametrize("text, entry, fragment", [("this is not ptx {", "k", "not PTX"),
                                                   (PTX, "no_such_kernel", "no entry named")])
def test_unusable_input_is_a_cached_refusal(cache, text, entry, fragment):
    for hit in (False, True):
        with pytest.raises(KernelRefused) as exc:
            transformed_module(text, entry, "slice", cache)
        assert exc.value.cache_hit is hit and fragment in exc.value.reason


def test_a_transformer_defect_is_not_cached(cache, monkeypatch):
    import tally.ptx.transform as t

    monkeypatch.setattr(t, "transform_module", lambda *a, **k: 1 / 0)
    for _ in range(2):
        with pytest.raises(KernelRefused) as exc:
            transformed_module(PTX, "saxpy", "ptb", cache)
        assert not exc.value.cache_hit and "ZeroDivisionError" in exc.value.reason


def test_a_new_tally_ptx_is_a_miss(cache, monkeypatch):
    transformed_module(PTX, "saxpy", "ptb", cache)
    monkeypatch.setattr(kc, "ptx_version", lambda: "0.2.0+feedfacefeedface")
    assert transformed_module(PTX, "saxpy", "ptb", cache)[1] is False


def test_ptx_version_tracks_the_transformer_sources():
    import tally

    kc.ptx_version.cache_clear()
    v = kc.ptx_version()
    assert v.startswith(tally.__version__ + "+") and len(v.split("+")[1]) == 16 and v == kc.ptx_version()


def _entry_path(cache, entry="saxpy", mode="ptb"):
    return cache.path(request_for(PTX, entry, mode))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _header_edit(**changes):
    def edit(data: bytes) -> bytes:
        head, payload = data.split(b"\n", 1)
        header = json.loads(head)
        header.update(changes)
        return _files.canonical_json(header) + b"\n" + payload
    return edit


CORRUPTIONS = {
    "empty": lambda d: b"",
    "truncated-header": lambda d: d[:40],
    "no-newline": lambda d: d.split(b"\n", 1)[0],
    "truncated-payload": lambda d: d[:-100],
    "extended": lambda d: d + b"\n// more",
    "payload-bit-flip": lambda d: _flip(d, len(d) - 50),
    "header-bit-flip": lambda d: _flip(d, 30),
    "binary-junk": lambda d: bytes(range(256)) * 4,
    "not-canonical": lambda d: json.dumps(json.loads(d.split(b"\n", 1)[0]), indent=1).replace("\n", " ").encode()
    + b"\n" + d.split(b"\n", 1)[1],
    "version-2": _header_edit(version=2),
    "foreign-format": _header_edit(format="someone-elses-cache"),
    "other-entry": _header_edit(entry="add_2d"),
    "other-mode": _header_edit(mode="slice"),
    "other-ptx-version": _header_edit(ptx_version="0.0.1+0000000000000000"),
    "other-key": _header_edit(key="0" * 64),
    "refused-without-reason": _header_edit(status="refused"),
    "ok-with-reason": _header_edit(reason="because"),
    "bad-status": _header_edit(status="maybe"),
    "length-as-string": lambda d: _header_edit(payload_bytes=str(len(d.split(b"\n", 1)[1])))(d),
    "extra-field": _header_edit(extra=1),
    "duplicate-key": lambda d: d.replace(b'{"artifact"', b'{"artifact":"ptx","artifact"', 1),
    "nan": lambda d: d.replace(b'"payload_bytes":', b'"payload_bytes":NaN,"x":', 1),
    "not-utf8-header": lambda d: b"\xff\xfe" + d,
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_entries_are_ignored_with_one_warning_and_repaired(cache, capsys, name):
    good, _ = transformed_module(PTX, "saxpy", "ptb", cache)
    path = _entry_path(cache)
    path.write_bytes(CORRUPTIONS[name](path.read_bytes()))
    for _ in range(2):  # one warning however often the entry is met
        assert kc.KernelCache(cache.root).get(request_for(PTX, "saxpy", "ptb")) is None
    text, hit = transformed_module(PTX, "saxpy", "ptb", cache)
    assert (text, hit) == (good, False)  # recomputed, never the corrupt payload
    warns = warnings_in(capsys)
    assert len(warns) == 1 and "not trusted" in warns[0] and str(path) in warns[0]
    assert transformed_module(PTX, "saxpy", "ptb", cache) == (good, True)  # repaired


def test_an_entry_copied_under_another_key_is_not_trusted(cache, capsys):
    transformed_module(PTX, "saxpy", "ptb", cache)
    other = _entry_path(cache, "add_2d", "ptb")
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(_entry_path(cache).read_bytes())
    text, hit = transformed_module(PTX, "add_2d", "ptb", cache)
    assert not hit and "add_2d__tally_ptb" in text and len(warnings_in(capsys)) == 1


def test_an_unreadable_entry_is_ignored(cache, capsys):
    transformed_module(PTX, "saxpy", "ptb", cache)
    path = _entry_path(cache)
    path.unlink()
    path.mkdir()  # reading it fails with EISDIR
    text, hit = transformed_module(PTX, "saxpy", "ptb", cache)
    assert not hit and "saxpy__tally_ptb" in text
    assert len(warnings_in(capsys)) >= 1


@pytest.mark.parametrize("index, fragment", [(b"tally-kernel-cache 2\n", "another version"),
                                             (b"tally-kernel-cache 1", "not a tally kernel cache index"),
                                             (b"\x00garbage", "not a tally kernel cache index"),
                                             (b"", "not a tally kernel cache index")])
def test_a_foreign_index_disables_the_cache_with_one_warning(cache, capsys, index, fragment):
    (cache.dir).mkdir(parents=True)
    (cache.dir / "INDEX").write_bytes(index)
    for _ in range(3):
        text, hit = transformed_module(PTX, "saxpy", "slice", KernelCache(cache.root))
        assert not hit and "saxpy__tally_slice" in text
    warns = warnings_in(capsys)
    assert len(warns) == 1 and fragment in warns[0] and "--clear" in warns[0]
    assert sorted(p.name for p in cache.dir.iterdir()) == ["INDEX"]  # nothing written there
    assert (cache.dir / "INDEX").read_bytes() == index  # and the index left alone
    cache.clear()
    transformed_module(PTX, "saxpy", "slice", cache)
    assert transformed_module(PTX, "saxpy", "slice", cache)[1] is True


def test_unwritable_cache_works_without_it(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = KernelCache(blocker / "kernels")  # its parent is a file: mkdir fails
    for _ in range(2):
        text, hit = transformed_module(PTX, "saxpy", "ptb", cache)
        assert not hit and "saxpy__tally_ptb" in text
    assert len(warnings_in(capsys)) == 1


def test_concurrent_writers_agree(cache):
    results, errors = [], []

    def work():
        try:
            results.append(transformed_module(PTX, "grid_ids_3d", "preemptible", KernelCache(cache.root))[0])
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert transformed_module(PTX, "grid_ids_3d", "preemptible", cache) == (results[0], True)
    assert not list(cache.dir.glob("*/*.tmp-*"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000))
def test_junk_is_never_trusted(tmp_path, junk):
    request = request_for(PTX, "saxpy", "ptb")
    with pytest.raises(ValueError):
        kc._verify(junk, request)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_byte_change_is_detected(tmp_path, data):
    request = request_for(PTX, "saxpy", "ptb")
    payload = b"// transformed\n.entry k() { ret; }\n"
    header = {"format": kc.FORMAT, "version": kc.VERSION, "key": request.key, "entry": "saxpy", "mode": "ptb",
              "artifact": "ptx", "ptx_version": request.ptx_version, "source_sha256": request.source_sha256,
              "status": "ok", "reason": None, "payload_bytes": len(payload),
              "payload_sha256": _files.sha256_hex(payload)}
    good = _files.canonical_json(header) + b"\n" + payload
    assert kc._verify(good, request).payload == payload
    at = data.draw(st.integers(0, len(good) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != good[at]))
    with pytest.raises(ValueError):
        kc._verify(good[:at] + bytes([value]) + good[at + 1:], request)


# ---------------------------------------------------------------- compiled cubins


def _fake_ptxas(tmp_path, release: str, fail: bool) -> Path:
    """A stand-in ptxas: says its version; assembles by copying a fixed ELF header, or fails."""
    script = tmp_path / f"ptxas-{release}-{int(fail)}"
    body = ('echo "ptxas error   : Entry function uses too much shared data" >&2; exit 255' if fail else
            'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done; printf "\\177ELFfake" > "$out"')
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "Cuda compilation tools, release 13.0, '
                      f'V{release}"; exit 0; fi\n{body}\n')
    script.chmod(0o755)
    return script


def test_compiled_cubins_are_cached_per_arch_and_ptxas_release(cache, tmp_path, monkeypatch):
    ptxas = _fake_ptxas(tmp_path, "13.0.88", fail=False)
    cubin, hit = kc.compiled_module(PTX, "saxpy", "preemptible", "sm_90", cache, ptxas)
    assert cubin == b"\x7fELFfake" and not hit
    monkeypatch.setattr(kc, "transformed_module", lambda *a: pytest.fail("a hit must not transform"))
    assert kc.compiled_module(PTX, "saxpy", "preemptible", "sm_90", KernelCache(cache.root), ptxas) == (cubin, True)
    monkeypatch.undo()
    # another architecture, or another assembler release, is another artifact
    assert kc.compiled_module(PTX, "saxpy", "preemptible", "sm_100", cache, ptxas)[1] is False
    assert kc.compiled_module(PTX, "saxpy", "preemptible", "sm_90", cache,
                              _fake_ptxas(tmp_path, "13.1.0", fail=False))[1] is False


def test_a_transformation_ptxas_rejects_is_a_cached_refusal(cache, tmp_path):
    ptxas = _fake_ptxas(tmp_path, "13.0.88", fail=True)
    with pytest.raises(KernelRefused) as first:
        kc.compiled_module(PTX, "saxpy", "ptb", "sm_90", cache, ptxas)
    assert "ptxas rejected the transformed module: ptxas error" in first.value.reason and not first.value.cache_hit
    with pytest.raises(KernelRefused) as again:
        kc.compiled_module(PTX, "saxpy", "ptb", "sm_90", cache, ptxas)
    assert again.value.cache_hit and again.value.reason == first.value.reason
    # a PTX-level refusal stays what it was; ptxas is never run for it
    with pytest.raises(KernelRefused) as refused:
        kc.compiled_module(REFUSED, "grid_sync", "ptb", "sm_90", cache, ptxas)
    assert "grid-wide sync" in refused.value.reason


def test_real_ptxas_assembles_a_transformed_kernel(cache):
    from tally.ptx import ptxas as ptxas_mod

    try:
        binary = ptxas_mod.find_ptxas()
    except Exception:  # noqa: BLE001
        pytest.skip("no ptxas")
    cubin, hit = kc.compiled_module(PTX, "saxpy", "preemptible", "sm_90", cache, binary)
    assert cubin[:4] == b"\x7fELF" and not hit
    assert kc.compiled_module(PTX, "saxpy", "preemptible", "sm_90", cache, binary) == (cubin, True)


def test_compiled_module_assembles_triton_sm_90a_ptx_for_sm_90a(cache):
    from tally.ptx import ptxas as ptxas_mod

    try:
        binary = ptxas_mod.find_ptxas()
    except Exception:  # noqa: BLE001
        pytest.skip("no ptxas")
    triton = (Path(__file__).parents[1] / "ptx" / "corpus" / "triton" / "sum_rows.ptx").read_text()
    assert ".target sm_90a" in triton
    cubin, _ = kc.compiled_module(triton, "sum_rows", "slice", "sm_90", cache, binary)
    assert cubin[:4] == b"\x7fELF" and b"sum_rows__tally_slice" in cubin
    # PTX for a newer GPU than asked for is refused, with the reason, and ptxas is not run
    with pytest.raises(KernelRefused, match="newer than sm_80"):
        kc.compiled_module(triton, "sum_rows", "slice", "sm_80", cache, binary)
