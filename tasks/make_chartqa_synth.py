"""Draw the synthetic ChartQA-schema test set used by the local tasks in this folder.

    python tasks/make_chartqa_synth.py            # writes tasks/data/chartqa_synth_test.parquet

Each row has ChartQA's columns (`type`: "human_test" or "augmented_test", `question`, `answer`,
`image`), so lmms-eval's own ChartQA functions (`lmms_eval.tasks.chartqa.utils`) read and score it.
The charts are small matplotlib bar and line charts drawn from a seeded generator; the answers are
read off the numbers used to draw them. Same seed, same questions and answers (the PNG bytes may
differ between matplotlib releases, which is why the parquet file is committed, not regenerated).
The file is written through `datasets`, so the `image` column carries the Image feature and
lmms-eval's documents hold PIL images.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

CATEGORIES = ("Apples", "Pears", "Plums", "Kiwis", "Limes")
YEARS = tuple(range(2015, 2021))
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "chartqa_synth_test.parquet"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


def bar_chart(rng: np.random.Generator) -> tuple[bytes, dict[str, int]]:
    import matplotlib.pyplot as plt

    values = {c: int(v) for c, v in zip(CATEGORIES, rng.choice(np.arange(5, 95), len(CATEGORIES), replace=False))}
    fig, ax = plt.subplots(figsize=(4, 3))
    bars = ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.bar_label(bars)
    ax.set_title("Fruit sold (crates)")
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png, values


def line_chart(rng: np.random.Generator) -> tuple[bytes, dict[int, int]]:
    import matplotlib.pyplot as plt

    values = {y: int(v) for y, v in zip(YEARS, rng.choice(np.arange(10, 60), len(YEARS), replace=False))}
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(list(values), list(values.values()), marker="o", color="tab:red")
    for year, value in values.items():
        ax.annotate(str(value), (year, value), textcoords="offset points", xytext=(0, 5), ha="center")
    ax.set_title("Visitors (thousands)")
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png, values


def make_rows(n_charts: int, seed: int) -> list[dict]:
    """Two questions per chart, one per ChartQA split type; bar and line charts alternate."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_charts):
        if index % 2 == 0:
            png, values = bar_chart(rng)
            name = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            questions = [
                ("human_test", f"How many crates of {name} were sold?", str(values[name])),
                ("augmented_test", "Which fruit sold the most crates?", max(values, key=values.get)),
            ]
        else:
            png, values = line_chart(rng)
            a, b = (int(y) for y in rng.choice(YEARS, 2, replace=False))
            questions = [
                ("human_test", "In which year were there the fewest visitors?", str(min(values, key=values.get))),
                (
                    "augmented_test",
                    f"What is the difference in visitors between {a} and {b}?",
                    str(abs(values[a] - values[b])),
                ),
            ]
        for kind, question, answer in questions:
            rows.append({"type": kind, "question": question, "answer": answer, "image": {"bytes": png, "path": None}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--charts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    from datasets import Dataset, Features, Image, Value

    features = Features(
        {"type": Value("string"), "question": Value("string"), "answer": Value("string"), "image": Image()}
    )
    dataset = Dataset.from_list(make_rows(args.charts, args.seed), features=features)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(args.out))
    print(f"wrote {len(dataset)} rows to {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
