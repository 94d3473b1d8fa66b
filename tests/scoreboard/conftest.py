import pytest

from tally import scoreboard


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    """A private stand-in for /dev/shm, so tests never touch real scoreboards."""
    directory = tmp_path / "shm"
    directory.mkdir()
    monkeypatch.setenv("TALLY_SHM_DIR", str(directory))
    return directory


@pytest.fixture
def board(shm_dir):
    sb = scoreboard.Scoreboard.create(scoreboard.scoreboard_path("GPU-test-0000"), "GPU-test-0000")
    yield sb
    sb.close()
