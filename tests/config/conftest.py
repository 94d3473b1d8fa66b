import pytest


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    """No system or user config of this machine leaks into a test: both
    paths point into the test's tmp dir (files absent until a test writes them)."""
    system = tmp_path / "etc-tally" / "config.toml"
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("TALLY_SYSTEM_CONFIG", str(system))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("TALLY_CONFIG", raising=False)
    return system, xdg / "tally" / "config.toml"
