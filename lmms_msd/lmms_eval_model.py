"""Deprecated alias of `lmms_msd.lmms_eval.plugin`, kept for one release so that scripts importing
`lmms_msd.lmms_eval_model` keep working."""

from lmms_msd.lmms_eval.plugin import LlavaMsdCalibrated, model_manifest

__all__ = ["LlavaMsdCalibrated", "model_manifest"]
