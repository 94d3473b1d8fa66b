import pytest
from click.testing import CliRunner

from tally.cli import main
from tally.ptx.cli import ptx_group
from tally.ptx.parse import read_module
from conftest import CORPUS


def test_check_prints_one_line_per_entry():
    result = CliRunner().invoke(ptx_group, ["check", str(CORPUS / "cuda" / "refused.ptx")])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "grid_sync: not transformable: grid-wide sync or cooperative launch (reads %envreg2)"
    assert lines[3].startswith("syncthreads_count: slice: transformable; ptb: not transformable: barrier form bar.red.popc")
    assert len(lines) == 6


def test_transform_writes_the_module_and_prints_the_abi(tmp_path):
    out = tmp_path / "out.ptx"
    result = CliRunner().invoke(ptx_group, ["transform", "--mode", "preemptible", str(CORPUS / "cuda" / "ordered.ptx"),
                                            "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "chained_scan -> chained_scan__tally_preemptible  (appended: u32 __tally_grid_x, u32 __tally_grid_y, " \
           "u32 __tally_grid_z, u64 __tally_state)" in result.output
    assert "retreat @4" in result.output
    assert [e.name for e in read_module(out).entries] == ["chained_scan", "chained_scan__tally_preemptible"]


@pytest.mark.parametrize("args, message", [
    (["ptx", "check", "/nonexistent.ptx"], "tally: error: cannot read /nonexistent.ptx"),
    (["ptx", "transform", "--mode", "slice", str(CORPUS / "cuda" / "barriers.cu"), "-o", "/tmp/x.ptx"], "not PTX"),
    (["ptx", "transform", "--mode", "ptb", "--entry", "nope", str(CORPUS / "cuda" / "ordered.ptx"), "-o", "/tmp/x.ptx"],
     "no entry named 'nope'"),
])
def test_errors_are_one_line_without_traceback(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
