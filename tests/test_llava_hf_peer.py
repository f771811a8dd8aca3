"""lmms-eval's own `llava_hf` model as a peer nobody here wrote: on the bundled target and a local task at
temperature 0 its answers must be the plugin's, plain and speculative, document for document (issue 10),
through each of its two prompt paths:

- its fallback template: the simple model (`--force_simple`, lmms_eval/models/simple/llava_hf.py) on a
  folder without a chat template uses lmms-eval's VICUNA_CHAT_TEMPLATE, "{system} USER: <image>\\n{question}
  ASSISTANT:", against our default conv_template=vicuna_v1;
- the folder's chat template: `--model llava_hf` as a user runs it (the chat model,
  lmms_eval/models/chat/llava_hf.py) applies the folder's chat template (the llava-hf model cards',
  "USER: <image>\\n{question} ASSISTANT:") to the task's messages, against our conv_template=llava_hf.

And a folder written by transformers' own `save_pretrained` of the bundled target's model and processor
(image settings inside processor_config.json, no preprocessor_config.json) loads in the plugin and
decodes what llava_hf decodes from that same folder (issue 12, item 5).

The configurations run in two `python -m lmms_eval --config` processes at a time, each running its share in
turn (lmms-eval's start-up, mostly imports, is paid once per process); lmms-eval exits 0 even when an
evaluation failed, so a run counts only when its results and samples files exist. llava_hf is run with
device=cpu, device_map=cpu and dtype=float32 (its defaults are CUDA and the checkpoint's float16), and
the plugin with device=cpu, dtype=float32, so both decode the same float32 model greedily. llava_hf
imports `decord` (the test extra installs it) and turns a failed `generate` into an empty answer, so
every answer is also checked to be non-empty. llava_hf returns the decoded text as it is (it starts with
a space: the first token is " This"), the plugin strips it (as lmms-eval's `llava` model does, and as
lmms-eval's filters do before scoring), so answers are compared stripped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmms_msd.commands.lmms_eval_runs import answer_differences, log_tail, read_answers
from lmms_msd.testbed.bundled import bundled_paths

REPO = Path(__file__).resolve().parents[1]
TASK = "msd_chartqa_synth_long"  # long answers (about 60 tokens): many steps for the speculative loop
LIMIT = 20
RUN_TIMEOUT_S = 600  # per configuration
PARALLEL_RUNS = 2
LLAVA_HF = "device=cpu,device_map=cpu,dtype=float32"
OURS = "device=cpu,dtype=float32"


@dataclass(frozen=True)
class Config:
    name: str
    model: str  # "llava_hf" or "llava_msd_calibrated"
    model_args: str
    force_simple: bool = False  # lmms-eval's --force_simple: the simple model of a model that has a chat one


def run_lmms_eval(configs: list[Config], root: Path) -> list[dict[int, str]]:
    """One `python -m lmms_eval --config` process running `configs` in turn (one import of lmms-eval for all),
    each into root/<index> -> per configuration, doc_id -> answer (stripped); fails the test, with the log's
    tail, for a configuration that left no results and samples."""
    root.mkdir(parents=True)
    outs = [root / str(i) for i in range(len(configs))]
    entries = [
        {
            "model": config.model, "model_args": config.model_args, "tasks": TASK, "include_path": str(REPO / "tasks"),
            "limit": LIMIT, "batch_size": 1, "log_samples": True, "output_path": str(out / "results"),
            "force_simple": config.force_simple,
        }
        for config, out in zip(configs, outs)
    ]  # fmt: skip
    config_file = root / "configs.yaml"
    config_file.write_text(json.dumps(entries, indent=2))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = root / "lmms_eval.log"
    with log.open("w") as handle:
        command = [sys.executable, "-m", "lmms_eval", "--config", str(config_file)]
        done = subprocess.run(command, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT_S * len(configs), check=False)  # fmt: skip
    answers = []
    for config, out in zip(configs, outs):
        if done.returncode != 0 or not list(out.rglob("*_results.json")) or not list(out.rglob(f"*_samples_{TASK}.jsonl")):
            pytest.fail(f"{config.name}: lmms-eval left no results and samples (exit {done.returncode}); the end of {log}:\n{log_tail(log)}")
        answers.append({doc_id: answer.strip() for doc_id, answer in read_answers(out, TASK).items()})
    return answers


def save_with_transformers(source: Path, dest: Path) -> Path:
    """The target as transformers' save_pretrained writes a LLaVA model and its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(str(source)).save_pretrained(str(dest))
    AutoProcessor.from_pretrained(str(source)).save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    target, draft = bundled_paths()
    root = tmp_path_factory.mktemp("peer-checkpoints")
    no_template = Path(shutil.copytree(target, root / "target-without-chat-template"))
    (no_template / "chat_template.jinja").unlink()
    return {
        "target": target, "draft": draft, "no_template": no_template,
        "saved": save_with_transformers(target, root / "saved-by-transformers"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def answers(folders, tmp_path_factory) -> dict[str, dict[int, str]]:
    """Configuration name -> doc_id -> answer, every configuration run once."""
    target, draft, saved = folders["target"], folders["draft"], folders["saved"]
    configs = [
        Config("llava_hf fallback template", "llava_hf", f"pretrained={folders['no_template']},{LLAVA_HF}", force_simple=True),
        Config("llava_hf chat template", "llava_hf", f"pretrained={target},{LLAVA_HF}"),
        Config("ours vicuna_v1 plain", "llava_msd_calibrated", f"use_msd=false,{OURS}"),
        Config("ours vicuna_v1 speculative", "llava_msd_calibrated", f"use_msd=true,{OURS}"),
        Config("ours llava_hf plain", "llava_msd_calibrated", f"use_msd=false,conv_template=llava_hf,{OURS}"),
        Config("ours llava_hf speculative", "llava_msd_calibrated", f"use_msd=true,conv_template=llava_hf,{OURS}"),
        Config("llava_hf saved folder", "llava_hf", f"pretrained={saved},{LLAVA_HF}"),
        Config(
            "ours saved folder speculative", "llava_msd_calibrated",
            f"pretrained={saved},msd_model_path={draft},use_msd=true,conv_template=llava_hf,{OURS}",
        ),  # fmt: skip
    ]
    root = tmp_path_factory.mktemp("peer-runs")
    groups = [configs[i::PARALLEL_RUNS] for i in range(PARALLEL_RUNS)]
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        runs = pool.map(lambda indexed: run_lmms_eval(indexed[1], root / f"process{indexed[0]}"), enumerate(groups))
        return {config.name: result for group, results in zip(groups, runs) for config, result in zip(group, results)}


def assert_same_answers(answers: dict[str, dict[int, str]], reference: str, *others: str) -> None:
    expected = answers[reference]
    assert sorted(expected) == list(range(LIMIT)), f"{reference}: doc_ids {sorted(expected)}"
    assert all(text.strip() for text in expected.values()), f"{reference} gave an empty answer (a failed generate)"
    for name in others:
        differing = answer_differences(expected, answers[name])
        assert not differing, "\n".join(
            f"doc {d}: {reference}: {expected.get(d)!r}\n        {name}: {answers[name].get(d)!r}" for d in differing
        )


def test_vicuna_v1_is_llava_hfs_fallback_template(answers):
    assert_same_answers(answers, "llava_hf fallback template", "ours vicuna_v1 plain", "ours vicuna_v1 speculative")


def test_llava_hf_template_is_llava_hfs_chat_template(answers):
    assert_same_answers(answers, "llava_hf chat template", "ours llava_hf plain", "ours llava_hf speculative")
    # the two prompts lead the miniature to different answers, so the two comparisons are two checks
    assert answers["llava_hf chat template"] != answers["llava_hf fallback template"]


def test_folder_saved_by_transformers_decodes_as_llava_hf(folders, answers):
    assert not (folders["saved"] / "preprocessor_config.json").exists()
    assert_same_answers(answers, "llava_hf saved folder", "ours saved folder speculative")
