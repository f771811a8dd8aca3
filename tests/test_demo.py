"""The README's main command: `lmms-msd demo` runs offline and its outputs are identical."""

from __future__ import annotations

from lmms_msd.commands.cli import main


def test_demo_outputs_are_identical_and_the_tree_accepts(capsys):
    assert main(["demo", "--max_new_tokens", "24", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "identical 4/4" in out
    tau = float(out.split("tau ")[-1].split(",")[0])
    assert tau >= 3.0, out
