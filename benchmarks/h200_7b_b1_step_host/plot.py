"""r39's interleaved A/B as one figure: OPT-Tree's ms/token per process, the previous release's code against this
release's, with each process's measured launch time. usage: python benchmarks/h200_7b_b1_step_host/plot.py"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
rows = []
for name in ("t0_old_1", "t0_new_1", "t0_old_2", "t0_new_2", "t0_old_3", "t0_new_3", "t1_old", "t1_new"):
    report = json.loads((here / "r39" / name / "bench.json").read_text())
    opt = next(m for m in report["methods"] if m["method"] == "opt")
    rows.append((name, opt["ms_per_token"], report["machine"]["launch_us"]))
fig, ax = plt.subplots(figsize=(7, 3.2))
colors = ["#999999" if "old" in name else "#1f77b4" for name, _, _ in rows]
bars = ax.bar(range(len(rows)), [ms for _, ms, _ in rows], color=colors)
for bar, (_, ms, launch) in zip(bars, rows):
    ax.annotate(f"{ms:.2f}\n{launch:.1f} us", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
ax.axhline(1.6, color="#d62728", lw=0.8, ls="--")
ax.axhline(1.8, color="#ff7f0e", lw=0.8, ls="--")
ax.set_xticks(range(len(rows)), [name.replace("_", " ") for name, _, _ in rows], fontsize=8)
ax.set_ylim(1.4, 2.0)
ax.set_ylabel("OPT-Tree ms/token")
ax.set_title("r39, one H200, in run order: grey = previous release's code, blue = this release's\n"
             "(labels: ms/token, host launch time; dashed: the issue's 1.6 / 1.8 targets)", fontsize=8)
fig.tight_layout()
fig.savefig(here / "r39_ab.png", dpi=120)
print(here / "r39_ab.png")
