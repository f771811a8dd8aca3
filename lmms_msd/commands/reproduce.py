"""`lmms-msd reproduce`: the thesis tables through lmms-eval.

Rows (the thesis's, plus the reference):

- plain decoding (`use_msd=false`): the reference for the answers and for tokens/s;
- MSD baseline (EAGLE-2 tree) (`tree=eagle2,...`);
- + OPT-Tree (`tree=opt,...,calibrator=none`: raw draft confidence);
- + OPT-Tree + calibrator (`tree=opt,...,calibrator=<file>`, or `calibrator=online,train_ratio=<r>`).

Each row's settings come from a named preset (`lmms_msd.commands.presets`, `--preset`): `thesis` (the default,
the thesis's own settings) or `tuned` (this project's); results.md and results.json print them.

Columns are lmms-eval tasks, one table per temperature. Each (row, task, temperature) is one lmms-eval
run, with `--log_samples`, under `<output_dir>/runs/t<temperature>/<task>/<row>`; each cell reads
alpha and tau (accepted draft tokens per step, and + 1) and tokens/s from the plugin's statistics, and
the score from lmms-eval's results: the task's primary metric, the first of its YAML's metric_list
(`lmms_msd.lmms_eval.metrics`), named in the column's header.

Without `--tasks`, the tasks are the real benchmarks' (chartqa, mathvista_testmini_format, ai2d,
mathverse_testmini, textvqa_val: lmms-eval tasks, not groups) when their datasets are in the Hugging Face
cache, else the five local families' long-answer tasks with `--include_path` the repository's tasks/
(`lmms_msd.commands.benchmark_data`); the log, results.md and results.json say which and why.

Greedy speculative decoding is lossless: at temperature 0 every row's answers must equal the plain
row's, doc_id by doc_id. A row whose answers differ is marked in every output and the command exits 1.
(At a positive temperature the rows sample different, equally distributed answers, so nothing is
compared.)

Outputs in `--output_dir`: results.md (the tables, the relative alpha gains and speedups, the
command), results.csv (one line per row x task x temperature), results.json, results.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shlex
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmms_msd.commands.benchmark_data import THESIS_TASKS, default_tasks
from lmms_msd.commands.lmms_eval_runs import (
    EvalRun,
    LmmsEvalFailed,
    answer_differences,
    read_answers,
    run_lmms_eval,
)
from lmms_msd.commands.presets import (
    CALIBRATED,
    DEFAULT,
    EAGLE2,
    FITTED,
    OPT,
    PLAIN,
    PRESETS,
    Preset,
    Row,
)
from lmms_msd.lmms_eval.metrics import primary_metric
from lmms_msd.models.prompt import TEMPLATE_SYSTEM_PROMPTS
from lmms_msd.pipeline import uses_bundled_pair
from lmms_msd.testbed.bundled import bundled_calibrator

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LOCAL_TASKS_DIR = REPO / "tasks"  # the local task families' YAMLs and data
DEFAULT_CALIBRATOR = REPO / "calibrators" / "miniature.json"  # fitted for the bundled pair
RESERVED_MODEL_ARGS = ("use_msd", "tree", "calibrator", "train_ratio", "stats_path")  # set per row, whatever the preset
FILES = ("results.md", "results.csv", "results.json", "results.png")


def shared_args(preset: Preset, conv_template: str | None) -> str | None:
    """The model_args every row shares: the preset's, or its own with `conv_template` as the prompt (None:
    the preset's unchanged)."""
    if conv_template is None:
        return None
    if conv_template not in TEMPLATE_SYSTEM_PROMPTS:
        raise SystemExit(f"lmms-msd reproduce: --conv_template {conv_template!r} is not one of {sorted(TEMPLATE_SYSTEM_PROMPTS)}")
    kept = [a for a in preset.shared.split(",") if a and not a.startswith("conv_template=")]
    return ",".join([*kept, f"conv_template={conv_template}"])


def reserved_model_args(preset: Preset) -> set[str]:
    """The model_args the rows set, which the user's --model_args may not."""
    return set(RESERVED_MODEL_ARGS) | preset.row_names()


@dataclass
class Measurement:
    """One cell: a row on a task at a temperature."""

    row: str
    task: str
    temperature: float
    alpha: float  # accepted draft tokens per step (the thesis's average acceptance length)
    tau: float  # committed tokens per step = alpha + 1
    score: float
    metric: str  # lmms-eval's key of the score, e.g. "relaxed_overall,none"
    tokens_per_s: float
    samples: int
    differing_doc_ids: list[int] | None = None  # temperature 0, vs the plain row; None: not compared

    @property
    def marked(self) -> bool:
        return bool(self.differing_doc_ids)


# ---- reading one run ----------------------------------------------------------------------------------------
def measure(run: EvalRun, row: Row, task: str, temperature: float) -> Measurement:
    if task not in run.results["results"] or task not in run.stats["tasks"]:
        raise LmmsEvalFailed(
            f"the run has no results for {task!r} (lmms-eval: {sorted(run.results['results'])}, statistics: "
            f"{sorted(run.stats['tasks'])}); is it a group? list its tasks instead"
        )
    metric, score = primary_metric(run.results, task)
    summary = run.stats["tasks"][task]["summary"]
    return Measurement(
        row.key, task, temperature, alpha=summary["alpha"], tau=summary["tau"], score=score, metric=metric,
        tokens_per_s=summary["tokens_per_s"], samples=summary["samples"],
    )  # fmt: skip


def mark_differences(measurements: Iterable[Measurement], answers: Mapping[tuple[str, str, float], Mapping[int, Any]]) -> None:
    """Sets `differing_doc_ids` of every speculative measurement at temperature 0 whose plain-row answers
    are known: `answers[(row, task, temperature)]` is a run's doc_id -> answer."""
    for m in measurements:
        reference = answers.get((PLAIN, m.task, m.temperature))
        if m.row != PLAIN and m.temperature == 0 and reference is not None:
            m.differing_doc_ids = answer_differences(reference, answers[(m.row, m.task, m.temperature)])


# ---- the table ---------------------------------------------------------------------------------------------
def index(measurements: Iterable[Measurement]) -> dict[tuple[str, str, float], Measurement]:
    return {(m.row, m.task, m.temperature): m for m in measurements}


def relative_gain(new: Measurement | None, old: Measurement | None, field: str = "alpha") -> float | None:
    """new / old - 1 of a field; None when a cell is missing or old's value is 0."""
    if new is None or old is None or not getattr(old, field):
        return None
    return getattr(new, field) / getattr(old, field) - 1


def gains(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    """Per task and temperature: alpha(+OPT)/alpha(EAGLE-2) - 1, alpha(+cal)/alpha(+OPT) - 1, and each
    speculative row's tokens/s over the plain row's."""
    cells = index(measurements)
    out = []
    for task, temperature in sorted({(m.task, m.temperature) for m in measurements}, key=lambda k: (k[1], k[0])):
        row = {key: cells.get((key, task, temperature)) for key in (PLAIN, EAGLE2, OPT, CALIBRATED)}
        entry: dict[str, Any] = {"task": task, "temperature": temperature}
        entry["opt_vs_eagle2"] = relative_gain(row[OPT], row[EAGLE2])
        entry["cal_vs_opt"] = relative_gain(row[CALIBRATED], row[OPT])
        for key in (EAGLE2, OPT, CALIBRATED):
            gain = relative_gain(row[key], row[PLAIN], "tokens_per_s")
            entry[f"speedup_{key}"] = None if gain is None else gain + 1
        out.append(entry)
    return out


def cell_text(m: Measurement | None) -> str:
    if m is None:
        return "–"
    text = f"{m.alpha:.2f} / {m.tau:.2f} / {m.score:.3f} / {m.tokens_per_s:.0f}"
    if m.marked:
        text += f" **DIFFERS** (doc_ids {', '.join(map(str, m.differing_doc_ids))})"
    return text


def markdown_tables(measurements: Sequence[Measurement], rows: Sequence[Row], tasks: Sequence[str], temperatures: Sequence[float]) -> str:
    """One table per temperature, rows x tasks (each headed by its score's metric), cells "alpha / tau / score /
    tok/s"; a row whose
    temperature-0 answers differ from the plain row's is marked in its label and in its cells."""
    cells = index(measurements)
    metrics = {m.task: m.metric.split(",")[0] for m in measurements}
    header = " | ".join(f"{task} ({metrics[task]})" if task in metrics else task for task in tasks)
    parts = []
    for temperature in temperatures:
        lines = [f"### Temperature {temperature:g}", "", f"| row | {header} |", "|---" * (len(tasks) + 1) + "|"]
        for row in rows:
            row_cells = [cells.get((row.key, task, temperature)) for task in tasks]
            label = row.label + (" ⚠ answers differ from plain decoding" if any(c and c.marked for c in row_cells) else "")
            lines.append(f"| {label} | " + " | ".join(cell_text(c) for c in row_cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def markdown_gains(entries: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| task | temperature | alpha +OPT / EAGLE-2 − 1 | alpha +cal / +OPT − 1 | speedup EAGLE-2 | speedup +OPT | speedup +cal |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        speedups = [e[f"speedup_{row}"] for row in (EAGLE2, OPT, CALIBRATED)]
        lines.append(
            f"| {e['task']} | {e['temperature']:g} | {percent(e['opt_vs_eagle2'])} | {percent(e['cal_vs_opt'])} | "
            + " | ".join("–" if s is None else f"{s:.2f}x" for s in speedups)
            + " |"
        )
    return "\n".join(lines)


def marked(measurements: Iterable[Measurement]) -> list[Measurement]:
    return [m for m in measurements if m.marked]


def markdown_settings(preset: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """The preset's name, summary, every row's model_args (as passed, after the user's) and its notes."""
    lines = [f"### Settings: preset `{preset['name']}`", "", f"{preset['summary']}.", "", "| row | model_args |", "|---|---|"]
    lines += [f"| {row.label} | `{row.model_args}` |" for row in rows]
    lines += ["", "Each row passes the pair's model_args (above) and then these; every other model_arg is the plugin's default."]
    if preset["notes"]:
        lines += [""] + [f"- {note}" for note in preset["notes"]]
    return "\n".join(lines)


def markdown_report(report: Mapping[str, Any], rows: Sequence[Row]) -> str:
    measurements = [Measurement(**m) for m in report["measurements"]]
    metrics = sorted({m.metric for m in measurements})
    compared = 0.0 in report["temperatures"]
    parts = [
        "# Reproduction: MSD baseline vs OPT-Tree vs OPT-Tree + calibrator",
        f"Command: `{report['command']}`",
        (
            f"Preset: {report['preset']['name']}. Calibrator: {report['calibrator']}. Docs per task: {report['limit'] or 'all'}. "
            f"Pair: {report['pair']}."
        ),
        *([f"Tasks: the default, {report['tasks_default']}."] if report.get("tasks_default") else []),
        (
            f"Cells: alpha (accepted draft tokens per step) / tau (tokens per step) / score ({', '.join(metrics)}) / "
            "tokens per second (generation only, summed over requests)."
        ),
        markdown_tables(measurements, rows, report["tasks"], report["temperatures"]),
        "### Relative alpha gains and speedups over plain decoding",
        markdown_gains(report["relative_gains"]),
    ]
    bad = marked(measurements)
    if bad:
        parts.append(
            "**Answers differ from plain decoding at temperature 0 (greedy speculative decoding must be lossless):** "
            + "; ".join(f"{m.row} on {m.task}, doc_ids {m.differing_doc_ids}" for m in bad)
        )
    elif compared:
        parts.append("At temperature 0 every row's answers equal plain decoding's, doc_id by doc_id.")
    else:
        parts.append("Answers were not compared (no temperature 0 in the run).")
    parts.append(markdown_settings(report["preset"], rows))
    return "\n\n".join(parts) + "\n"


CSV_FIELDS = ("row", "label", "task", "temperature", "alpha", "tau", "score", "metric", "tokens_per_s", "samples",
              "answers_compared", "answers_differ", "differing_doc_ids")  # fmt: skip


def write_csv(measurements: Sequence[Measurement], rows: Sequence[Row], path: Path) -> None:
    labels = {r.key: r.label for r in rows}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for m in measurements:
            values = asdict(m)
            differing = values.pop("differing_doc_ids")
            writer.writerow({
                **values, "label": labels[m.row], "answers_compared": differing is not None,
                "answers_differ": bool(differing), "differing_doc_ids": " ".join(map(str, differing or [])),
            })  # fmt: skip


def plot(measurements: Sequence[Measurement], rows: Sequence[Row], tasks: Sequence[str], temperatures: Sequence[float], path: Path) -> None:
    """Grouped bars (one group per task, one bar per row): alpha, tau, score and tokens/s (one line of
    panels each), one column of panels per temperature. Rows with differing answers are hatched."""
    # matplotlib is imported when the figure is drawn, not when `lmms-msd --help` imports this module
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = (("alpha", "alpha (accepted / step)", rows[1:]), ("tau", "tau (tokens / step)", rows[1:]),
              ("score", "score", rows), ("tokens_per_s", "tokens / s", rows))  # fmt: skip
    cells = index(measurements)
    fig = Figure(figsize=(max(4.5, 1.3 * len(tasks) + 2.5) * len(temperatures), 2.6 * len(panels)), dpi=110)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), len(temperatures), squeeze=False)
    colours = {r.key: f"C{i}" for i, r in enumerate(rows)}
    for col, temperature in enumerate(temperatures):
        for line, (field, ylabel, shown) in enumerate(panels):
            ax = axes[line][col]
            width = 0.8 / len(shown)
            for i, row in enumerate(shown):
                for t, task in enumerate(tasks):
                    m = cells.get((row.key, task, temperature))
                    if m is not None:
                        ax.bar(t + (i - (len(shown) - 1) / 2) * width, getattr(m, field), width, color=colours[row.key],
                               hatch="xx" if m.marked else None, label=row.label if t == 0 else None)  # fmt: skip
            ax.set_xticks(range(len(tasks)), tasks if line == len(panels) - 1 else [""] * len(tasks), fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            if line == 0:
                ax.set_title(f"temperature {temperature:g}", fontsize=9)
    handles, labels = axes[-1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(rows), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    canvas.print_png(str(path))


def write_outputs(report: dict[str, Any], rows: Sequence[Row], output_dir: Path) -> str:
    """results.{md,csv,json,png} in `output_dir`; returns the markdown."""
    measurements = [Measurement(**m) for m in report["measurements"]]
    text = markdown_report(report, rows)
    (output_dir / "results.md").write_text(text)
    write_csv(measurements, rows, output_dir / "results.csv")
    (output_dir / "results.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    plot(measurements, rows, report["tasks"], report["temperatures"], output_dir / "results.png")
    return text


# ---- the command ---------------------------------------------------------------------------------------------
def parse_temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--temperatures takes numbers separated by commas, e.g. 0,1; got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--temperatures needs at least one temperature >= 0; got {text!r}")
    return values


def gen_kwargs_for(temperature: float) -> str:
    return "temperature=0,do_sample=False" if temperature == 0 else f"temperature={temperature:g},do_sample=True"


def model_arg_values(model_args: str) -> dict[str, str]:
    """name -> value of a model_args string ("a=1,b=x")."""
    pairs = (part.split("=", 1) for part in model_args.split(",") if part.strip())
    return {pair[0].strip(): pair[1] if len(pair) > 1 else "" for pair in pairs}


def default_calibrator() -> Path | None:
    """The calibrator fitted for the bundled pair: the repository's calibrators/miniature.json, else the
    copy shipped in the package (an installed wheel has no repository); None when neither exists."""
    if DEFAULT_CALIBRATOR.is_file():
        return DEFAULT_CALIBRATOR
    try:
        return bundled_calibrator()
    except FileNotFoundError:
        return None


def choose_calibrator(calibrator: str | None, train_ratio: float | None, bundled_pair: bool, preset: Preset) -> tuple[str, str]:
    """(the calibrated row's calibrator model_args, a sentence saying which calibrator it is).

    `calibrator` (a file or "online") and `train_ratio`, when given, override the preset's. Unset, a
    FITTED preset takes the calibrator fitted for the bundled pair when the pair is the bundled one and
    the file exists, an ONLINE one online calibration; online calibration observes the first
    `train_ratio` (the preset's unless given) of each run's requests.
    """
    ratio = preset.train_ratio if train_ratio is None else train_ratio
    if calibrator is None and bundled_pair and preset.calibrator == FITTED:
        fitted = default_calibrator()
        calibrator = None if fitted is None else str(fitted)
    if calibrator is None or calibrator == "online":
        if calibrator == "online":
            why = ""
        elif preset.calibrator != FITTED:
            why = f" (preset {preset.name})"
        elif bundled_pair:
            why = f" ({DEFAULT_CALIBRATOR.relative_to(REPO)} not found)"
        else:
            why = " (no --calibrator given for this pair)"
        text = f"online, fitted on the first {ratio:g} of each run's requests{why}"
        return preset.online(ratio), text
    path = Path(calibrator)
    if not path.is_file():
        raise SystemExit(f"lmms-msd reproduce: --calibrator {calibrator}: no such file; fit one with `lmms-msd calibrate` or pass online")
    if "," in str(path.resolve()):
        raise SystemExit(f"lmms-msd reproduce: --calibrator {calibrator}: lmms-eval's model_args cannot hold a path with a comma; move the file")
    return f"calibrator={path.resolve()}", f"file {path}"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every setting spelled out."""
    words = ["lmms-msd", "reproduce", "--preset", args.preset, "--tasks", args.tasks]
    if args.include_path is not None:
        words += ["--include_path", str(args.include_path)]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    words += ["--temperatures", ",".join(f"{t:g}" for t in args.temperatures)]
    if args.model_args:
        words += ["--model_args", args.model_args]
    if args.conv_template is not None:
        words += ["--conv_template", args.conv_template]
    if args.calibrator is not None:
        words += ["--calibrator", args.calibrator]
    if args.train_ratio is not None:
        words += ["--train_ratio", f"{args.train_ratio:g}"]
    words += ["--output_dir", str(args.output_dir)]
    return shlex.join(words)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--preset", default=DEFAULT, choices=sorted(PRESETS),
        help=f"the rows' settings (lmms_msd.commands.presets): thesis (the thesis's own) or tuned (this project's) (default {DEFAULT})",
    )  # fmt: skip
    parser.add_argument(
        "--tasks", default=None,
        help=f"lmms-eval tasks, comma-separated (default: the real benchmarks {','.join(THESIS_TASKS)} when their datasets are "
        "in the Hugging Face cache, else the local families' long-answer tasks msd_<family>_synth_long with --include_path "
        "the repository's tasks/)",
    )  # fmt: skip
    parser.add_argument("--include_path", type=Path, default=None, help="a folder of extra task YAMLs, e.g. the repository's tasks/")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--temperatures", type=parse_temperatures, default=[0.0, 1.0], help="comma-separated (default 0,1)")
    parser.add_argument("--model_args", default="", help="passed to every row, e.g. pretrained=...,msd_model_path=... (default: the bundled pair)")
    parser.add_argument(
        "--conv_template", default=None,
        help="every row's prompt, replacing the preset's (the thesis's is msd, MSD's own; a pair trained on another "
        "prompt, such as the bundled miniature on vicuna_v1, is measured on its own) [the preset's]",
    )  # fmt: skip
    parser.add_argument(
        "--calibrator", default=None,
        help="the calibrated row's calibrator JSON, or 'online' (default: the preset's; tuned: "
        f"{DEFAULT_CALIBRATOR.relative_to(REPO)} when it exists and the pair is the bundled one, else online; thesis: online)",
    )  # fmt: skip
    parser.add_argument(
        "--train_ratio", type=float, default=None, help="online calibration's observed share (default: the preset's; thesis 0.2, tuned 0.3)"
    )  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=Path("build/reproduce"), help="results.* and runs/ (replaced) go here")
    return run


def choose_tasks(args: argparse.Namespace) -> str | None:
    """Sets args.tasks (and args.include_path for the local families) when --tasks was not given; returns
    the sentence saying which default was taken and why (None when --tasks was given)."""
    if args.tasks is not None:
        return None
    choice = default_tasks()
    args.tasks = ",".join(choice.tasks)
    if choice.local and args.include_path is None:
        if not LOCAL_TASKS_DIR.is_dir():
            raise SystemExit(
                f"lmms-msd reproduce: {choice.why}; but there is no tasks folder at {LOCAL_TASKS_DIR} (an installed package "
                "has none): pass the repository's tasks/ with --include_path"
            )
        args.include_path = LOCAL_TASKS_DIR
    log.info("no --tasks: %s (%s)", args.tasks, choice.why)
    return choice.why


def run(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    given = model_arg_values(args.model_args)
    reserved = sorted(given.keys() & reserved_model_args(preset))
    if reserved:
        raise SystemExit(
            f"lmms-msd reproduce: --model_args may not set {reserved}: the rows of preset {preset.name} set them "
            f"(lmms_msd.commands.presets; the prompt is --conv_template)"
        )
    if args.tasks is not None and not args.tasks.strip(", "):
        raise SystemExit("lmms-msd reproduce: --tasks is empty")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"lmms-msd reproduce: --limit must be at least 1, got {args.limit}")
    if args.train_ratio is not None and not 0 < args.train_ratio <= 1:
        raise SystemExit(f"lmms-msd reproduce: --train_ratio must be in (0, 1], got {args.train_ratio}")
    tasks_default = choose_tasks(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bundled_pair = uses_bundled_pair(given.get("pretrained"), given.get("msd_model_path"))
    calibrator_args, calibrator_text = choose_calibrator(args.calibrator, args.train_ratio, bundled_pair, preset)
    rows = preset.table_rows(calibrator_args, shared_args(preset, args.conv_template))  # plain first: the others' answers are compared with its
    log.info("calibrator: %s", calibrator_text)
    runs_dir = args.output_dir / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)  # an earlier reproduce's runs; each run needs an empty folder
    measurements = measure_all(args, rows, tasks, runs_dir)
    report = {
        "command": command_line(args),
        "preset": {"name": preset.name, "summary": preset.summary, "notes": list(preset.notes)},
        "calibrator": calibrator_text,
        "pair": args.model_args if not bundled_pair else "the bundled miniature pair",
        "tasks": tasks,
        "tasks_default": tasks_default,
        "temperatures": args.temperatures,
        "limit": args.limit,
        "rows": [asdict(r) for r in rows],
        "measurements": [asdict(m) for m in measurements],
        "relative_gains": gains(measurements),
    }
    text = write_outputs(report, rows, args.output_dir)
    print(text)
    print(f"written to {args.output_dir}: {', '.join(FILES)}")
    bad = marked(measurements)
    for m in bad:
        log.error("%s on %s at temperature 0: answers differ from plain decoding on doc_ids %s", m.row, m.task, m.differing_doc_ids)
    return 1 if bad else 0


def measure_all(args: argparse.Namespace, rows: Sequence[Row], tasks: Sequence[str], runs_dir: Path) -> list[Measurement]:
    """Every (temperature, task, row) run, the plain row first so that the others' answers can be compared
    as they come."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # small models on CPU: threads cost more than they give
    total = len(args.temperatures) * len(tasks) * len(rows)
    measurements = []
    answers: dict[tuple[str, str, float], dict[int, Any]] = {}
    for temperature in args.temperatures:
        for task in tasks:
            for row in rows:
                out = runs_dir / f"t{temperature:g}" / task / row.key
                model_args = ",".join(a for a in (args.model_args, row.model_args) if a)
                try:
                    result = run_lmms_eval(
                        out, task, include_path=args.include_path, limit=args.limit, model_args=model_args,
                        gen_kwargs=gen_kwargs_for(temperature), log_samples=True, env=env,
                    )  # fmt: skip
                    m = measure(result, row, task, temperature)
                    answers[(row.key, task, temperature)] = read_answers(out, task)
                except LmmsEvalFailed as error:
                    raise SystemExit(f"lmms-msd reproduce: row '{row.label}', task {task}, temperature {temperature:g}: {error}") from error
                mark_differences([m], answers)
                measurements.append(m)
                log.info(
                    "[%d/%d] %s | %s | T=%g: alpha %.2f, tau %.2f, %s %.3f, %.0f tok/s%s (%.0f s)", len(measurements), total,
                    row.label, task, temperature, m.alpha, m.tau, m.metric, m.score, m.tokens_per_s,
                    f", ANSWERS DIFFER on {len(m.differing_doc_ids)} docs" if m.marked else "", result.wall_s,
                )  # fmt: skip
    return measurements
