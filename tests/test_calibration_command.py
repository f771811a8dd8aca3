"""`lmms-msd calibrate` end to end on a tiny pair and a tiny data folder made here."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from conftest import random_image

from lmms_msd.calibration.isotonic import GroupedIsotonicCalibrator
from lmms_msd.calibration.observations import Observations
from lmms_msd.commands.calibrate import pair_paths
from lmms_msd.commands.cli import main
from lmms_msd.models.draft import DraftConfig, new_random_draft, save_draft

QUESTIONS = ["What is the value of the red bar?", "Which colour has the largest value?", "How many bars are there?"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """llava_train.json with 6 long-answer records (and 2 short ones) and their PNGs."""
    folder = tmp_path_factory.mktemp("charts")
    (folder / "images" / "train").mkdir(parents=True)
    records = []
    for i in range(8):
        image = f"images/train/{i:06d}.png"
        random_image(40, 40, seed=i).save(folder / image)
        records.append(
            {
                "id": f"train-{i:06d}-0-{'long' if i < 6 else 'short'}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + QUESTIONS[i % 3]},
                    {"from": "gpt", "value": "The red bar is 40.\nAnswer: 40"},
                ],
                "style": "long" if i < 6 else "short",
                "question_type": "value",
            }
        )
    (folder / "llava_train.json").write_text(json.dumps(records))
    return folder


@pytest.fixture(scope="module")
def draft_dir(tiny_hf_target, tmp_path_factory):
    config = DraftConfig.like_target(tiny_hf_target.model.config.text_config, tiny_hf_target.vocab_size)
    return save_draft(new_random_draft(config, seed=3, std=0.1), tmp_path_factory.mktemp("draft") / "msd")


SMALL = ["--max_new_tokens", "8", "--node_budget", "10", "--top_k", "3", "--max_depth", "4", "--no_progress"]


def test_calibrate_decodes_fits_and_reports(tiny_hf_dir, draft_dir, data_dir, tmp_path, capsys):
    output = tmp_path / "calibrators" / "tiny.json"
    report_dir = tmp_path / "report"
    observations_file = tmp_path / "obs.npz"
    status = main(
        ["calibrate", "--pretrained", str(tiny_hf_dir), "--msd_model_path", str(draft_dir), "--data_dir", str(data_dir),
         "--output", str(output), "--report_dir", str(report_dir), "--attention_bins", "2", "--min_group_size", "5",
         "--save_observations", str(observations_file), *SMALL]
    )  # fmt: skip
    assert status == 0
    assert "written to" in capsys.readouterr().out
    observations = Observations.load(observations_file)
    assert sorted(set(observations.request.tolist())) == list(range(6))  # the long records only
    assert not np.isnan(observations.visual).any() and observations.visual.max() > 0
    assert set(np.unique(observations.hard)) <= {0.0, 1.0}  # temperature 0: greedy labels
    assert observations.meta["temperature"] == 0 and observations.meta["split"] == "train"

    calibrator = GroupedIsotonicCalibrator.load(output)
    report = json.loads((report_dir / "report.json").read_text())
    assert report["label"] in ("hard", "soft") and calibrator.label == report["label"]
    assert report["label_comparison"]["winner"] == report["label"]
    groups = {"all", "number", "punctuation/function", "content", "depth 1"}
    assert groups <= set(report["label_comparison"]["hard"]) <= groups | {"depth >= 2"}  # deeper: when some were reached
    assert report["settings"]["depth_edges"] == [2] and calibrator.depth_edges == (2,)  # the default: depth 1 apart
    assert report["observations"]["total"] == len(observations)
    assert report["observations"]["fit_requests"] == 3 and report["observations"]["held_out_requests"] == 3
    assert "ECE raw" in (report_dir / "report.md").read_text()
    assert (report_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"

    # refit from the saved observations with a given label: no decoding, same split
    again = tmp_path / "again.json"
    assert main(["calibrate", "--observations", str(observations_file), "--output", str(again), "--label", "soft",
                 "--attention_bins", "2", "--min_group_size", "5"]) == 0  # fmt: skip
    assert GroupedIsotonicCalibrator.load(again).label == "soft"
    pooled = tmp_path / "pooled.json"
    assert main(["calibrate", "--observations", str(observations_file), "--output", str(pooled), "--depth_edges", "none",
                 "--attention_bins", "2", "--min_group_size", "5"]) == 0  # fmt: skip
    assert GroupedIsotonicCalibrator.load(pooled).depth_edges == ()
    report_again = json.loads((tmp_path / "again_report" / "report.json").read_text())
    assert report_again["observations"] == report["observations"]


def test_calibrate_at_temperature_one_records_probabilities(tiny_hf_dir, draft_dir, data_dir, tmp_path):
    observations_file = tmp_path / "obs.json"
    status = main(
        ["calibrate", "--pretrained", str(tiny_hf_dir), "--msd_model_path", str(draft_dir), "--data_dir", str(data_dir),
         "--style", "all", "--limit", "4", "--temperature", "1", "--attention_bins", "1", "--output", str(tmp_path / "c.json"),
         "--save_observations", str(observations_file), *SMALL]
    )  # fmt: skip
    assert status == 0
    observations = Observations.load(observations_file)
    assert ((observations.hard >= 0) & (observations.hard <= 1)).all()
    assert len(set(np.round(observations.hard, 6))) > 2  # probabilities, not 0/1
    assert np.all(observations.soft >= observations.hard - 1e-12)  # p / q >= p, capped at 1


def test_missing_inputs_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="exactly one of --data_dir"):
        main(["calibrate", "--output", str(tmp_path / "c.json")])
    with pytest.raises(FileNotFoundError, match="no llava_train.json"):
        main(["calibrate", "--data_dir", str(tmp_path), "--pretrained", "t", "--msd_model_path", "d", "--output", "x.json"])
    with pytest.raises(SystemExit, match="calibrate: name both --pretrained and --msd_model_path, or neither"):
        pair_paths(argparse.Namespace(pretrained="t", msd_model_path=None))
    monkeypatch.setattr("lmms_msd.testbed.bundled.BUNDLED", tmp_path / "absent")  # as if the bundled pair were not installed
    with pytest.raises(SystemExit, match="pass --pretrained <target> --msd_model_path <draft>"):
        pair_paths(argparse.Namespace(pretrained=None, msd_model_path=None))
