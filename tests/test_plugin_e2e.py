"""End to end through lmms-eval's command line (issue 3's "Done when"), on tiny checkpoints.

`python -m lmms_eval --model llava_msd_calibrated ... --tasks msd_chartqa_synth --limit 8 --log_samples
--output_path out` must write lmms-eval's results and samples plus the statistics file; with
use_msd=false the logged answers must be the same per doc_id (greedy), for both checkpoint layouts;
and `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) must give the same per-document
answers as one process.

`python -m lmms_eval` exits 0 even when evaluation fails, so every run is checked by its files. The
runs are subprocesses (about 15 s each, 30 s for two processes); a module-level cache shares the
one-process speculative run between the layout test and the data-parallel test, and the four one-process
runs go two at a time.

The targets are copies of the tiny checkpoints with their context dampened (`tiny.dampen_context_`,
applied to the weight files) and the drafts are `tiny.following_draft` heads saved with `save_draft`,
so most drafts are accepted and whole accepted paths (cut by max_new_tokens) pass through the plugin. OMP_NUM_THREADS=1
keeps the tiny models from spending their time in thread hand-offs on a small CPU machine (accelerate
sets the same for its processes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest
import torch

from lmms_msd.models.draft import save_draft
from lmms_msd.models.loading import load_target
from lmms_msd.testbed.tiny import following_draft

REPO = Path(__file__).resolve().parents[1]
TASK = "msd_chartqa_synth"
LIMIT = 8
RUN_TIMEOUT_S = 600
PARALLEL_RUNS = 2  # one-process runs at a time (two cores)
CONTEXT_SCALE = 0.05  # as the demo: the next token depends mostly on the current one

try:
    metadata.distribution("lmms-msd")
    INSTALLED = True
except metadata.PackageNotFoundError:
    INSTALLED = False
pytestmark = pytest.mark.skipif(
    not INSTALLED, reason="lmms-msd is not installed (pip install .): lmms-eval finds the model through its entry point"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmms_eval_command(model_args: str, out: Path, processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "lmms_eval",
        ]  # fmt: skip
    return launcher + [
        "--model", "llava_msd_calibrated", "--model_args", model_args,
        "--tasks", TASK, "--include_path", str(REPO / "tasks"), "--limit", str(LIMIT),
        "--gen_kwargs", "max_new_tokens=8", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip


class Run:
    """The files one lmms-eval run wrote under its --output_path."""

    def __init__(self, out: Path, log: str) -> None:
        self.out = out
        results = sorted(out.glob("*/*_results.json"))
        samples = sorted(out.glob(f"*/*_samples_{TASK}.jsonl"))
        stats = out / "msd_stats.json"
        if not (results and samples and stats.is_file()):
            found = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
            pytest.fail(
                f"lmms-eval wrote {found} under {out}, not results, samples and msd_stats.json; log tail:\n{log[-6000:]}"
            )
        self.results = json.loads(results[-1].read_text())
        self.samples = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
        self.stats = json.loads(stats.read_text())

    @property
    def answers(self) -> dict[int, str]:
        return {s["doc_id"]: s["filtered_resps"] for s in self.samples}


def dampened_copy(folder: Path, dest: Path, scale: float) -> Path:
    """A copy of a tiny checkpoint whose language model's attention and MLP outputs are scaled by
    `scale`: `tiny.dampen_context_` applied to the weight files (o_proj / down_proj of the language
    model; the CLIP tower names its projections out_proj / fc2, and the original layout keeps it in
    another folder)."""
    shutil.copytree(folder, dest)

    def dampen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hits = [k for k in state if k.endswith(("o_proj.weight", "down_proj.weight")) and "vision" not in k]
        assert hits, f"no o_proj / down_proj weights in {folder}"
        return {k: v * scale if k in hits else v for k, v in state.items()}

    from safetensors.torch import load_file, save_file

    for file in dest.glob("*.safetensors"):
        save_file(dampen(load_file(str(file))), str(file), metadata={"format": "pt"})
    for file in dest.glob("pytorch_model.bin"):
        torch.save(dampen(torch.load(file, weights_only=True)), file)
    return dest


@pytest.fixture(scope="module")
def checkpoints(tiny_hf_dir, tiny_original_dir, tmp_path_factory):
    """layout -> (a dampened copy of the tiny target, the following draft of that copy)."""
    root = tmp_path_factory.mktemp("e2e-checkpoints")
    pairs = {}
    for layout, folder in (("hf", tiny_hf_dir), ("original", tiny_original_dir)):
        target_dir = dampened_copy(folder, root / f"target-{layout}", CONTEXT_SCALE)
        draft_dir = save_draft(following_draft(load_target(str(target_dir))), root / f"draft-{layout}")
        pairs[layout] = (target_dir, draft_dir)
    return pairs


@pytest.fixture(scope="module")
def lmms_eval_run(checkpoints, tmp_path_factory):
    """run(layout, use_msd, processes) -> Run, each distinct run done once per module. The one-process runs
    of both layouts are started together on first use, PARALLEL_RUNS at a time (each is one single-threaded
    process, most of it lmms-eval's start-up)."""
    cache: dict[tuple[str, bool, int], Run] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def launch(key: tuple[str, bool, int]) -> Run:
        layout, use_msd, processes = key
        target, draft = checkpoints[layout]
        cwd = tmp_path_factory.mktemp(f"run-{layout}-{'msd' if use_msd else 'plain'}-{processes}")
        model_args = f"pretrained={target},msd_model_path={draft}" + (",use_msd=true" if use_msd else ",use_msd=false")
        command = lmms_eval_command(model_args, cwd / "out", processes)
        done = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        return Run(cwd / "out", done.stdout + done.stderr)

    def run(layout: str, use_msd: bool, processes: int = 1) -> Run:
        key = (layout, use_msd, processes)
        if key not in cache and processes == 1:
            keys = [(lay, msd, 1) for lay in checkpoints for msd in (True, False)]
            with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
                cache.update(zip(keys, pool.map(launch, keys)))
        if key not in cache:
            cache[key] = launch(key)
        return cache[key]

    return run


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_speculative_and_plain_runs_agree(lmms_eval_run, layout):
    speculative, plain = lmms_eval_run(layout, use_msd=True), lmms_eval_run(layout, use_msd=False)
    for run in (speculative, plain):
        assert "relaxed_overall,none" in run.results["results"][TASK]
        assert sorted(run.answers) == list(range(LIMIT))
        summary = run.stats["tasks"][TASK]["summary"]
        assert summary["samples"] == LIMIT and summary["new_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert speculative.stats["decoding"] == "speculative" and plain.stats["decoding"] == "plain"
    assert plain.stats["tasks"][TASK]["summary"]["tau"] == 1.0
    assert speculative.stats["tasks"][TASK]["summary"]["tau"] > 1.5  # the following draft is mostly accepted
    assert speculative.answers == plain.answers


def test_two_processes_give_the_same_answers_as_one(lmms_eval_run):
    one, two = lmms_eval_run("hf", use_msd=True), lmms_eval_run("hf", use_msd=True, processes=2)
    assert two.answers == one.answers
    assert two.stats["processes"] == 2
    rows = two.stats["tasks"][TASK]["samples"]
    assert [r["doc_id"] for r in rows] == list(range(LIMIT))  # gathered from both ranks, no padding copies
    assert {r["rank"] for r in rows} == {0, 1}
    assert [r["new_tokens"] for r in rows] == [r["new_tokens"] for r in one.stats["tasks"][TASK]["samples"]]
