"""The embedded default: the miniature target and its MSD draft, shipped inside the package.

They are what `llava_msd_calibrated` and the `lmms-msd` commands use when no `pretrained` /
`msd_model_path` is given (with `tree=opt`, also the calibrator fitted for them): a LLaVA-1.5-architecture model trained on synthetic charts
(`lmms_msd.testbed`), small enough for a CPU, and a draft trained for it with `lmms-msd train-draft`.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "miniature"


def bundled_paths() -> tuple[Path, Path]:
    """(target folder, draft folder) of the embedded default."""
    target, draft = BUNDLED / "target", BUNDLED / "draft"
    for folder in (target, draft):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled miniature pair is missing ({folder / 'config.json'} does not exist); reinstall "
                "lmms-msd, or pass pretrained=... and msd_model_path=... explicitly"
            )
    return target, draft


def bundled_calibrator() -> Path:
    """The calibrator fitted for the bundled pair (`calibrators/miniature.json`, shipped in the package
    as assets/miniature/calibrator.json): the default of `tree=opt` with the bundled pair."""
    path = BUNDLED / "calibrator.json"
    if not path.is_file():
        raise FileNotFoundError(f"the bundled pair's calibrator is missing ({path}); pass calibrator=... or calibrator=none")
    return path
