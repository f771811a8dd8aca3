"""The `lmms-msd` command line: version, help and usage errors, in-process and as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

from lmms_msd import __version__
from lmms_msd.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
VERSION_LINE = f"lmms-msd {__version__}"


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == VERSION_LINE


def test_help_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmms-msd")
    assert "--version" in out


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["--no-such-option"]])
def test_usage_errors_exit_2_on_stderr(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "lmms-msd: error:" in captured.err


@pytest.mark.parametrize("module", ["lmms_msd.commands.cli", "lmms_msd"])
def test_version_and_help_as_module(module: str) -> None:
    # three processes, two at a time: each spends its time importing the command modules
    with ThreadPoolExecutor(2) as pool:
        version, help_, no_command = pool.map(lambda argv: _run(sys.executable, "-m", module, *argv), [["--version"], ["--help"], []])
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == VERSION_LINE

    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("usage: lmms-msd")

    assert no_command.returncode == 2
    assert no_command.stdout == ""
    assert "lmms-msd: error:" in no_command.stderr


def _installed_version() -> str | None:
    try:
        return metadata.version("lmms-msd")
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_installed_version() is None, reason="lmms-msd is not installed here (pip install .)")
def test_installed_console_script() -> None:
    """The console script that `pip install .` puts next to the interpreter, and the package metadata."""
    assert _installed_version() == __version__
    script = Path(sys.executable).parent / "lmms-msd"
    assert script.exists(), f"{script} missing: is setup.cfg's console_scripts entry right?"
    version = _run(str(script), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == VERSION_LINE
