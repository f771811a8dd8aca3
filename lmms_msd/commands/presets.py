"""Named settings for the rows of the thesis tables (`lmms-msd reproduce --preset NAME`).

A preset is the model_args of each row (plain decoding, the MSD baseline, + OPT-Tree, + calibrator),
the model_args every row shares (the prompt), and how the calibrated row gets its calibrator (online,
or the file fitted for the pair). Two presets:

- `thesis`: the settings of the thesis's own code (ljc0359/Speculative-Decoding-For-Vision-Language-Model
  at e85f00d; files and lines in `notes`), as far as this plugin can express them;
- `tuned`: this project's settings, as tuned on the bundled pair (the plugin's defaults).

Every value a row sets is written out, so that results.md and results.json say exactly what ran.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN, EAGLE2, OPT, CALIBRATED = "plain", "eagle2", "opt", "opt_cal"  # row keys: folders, CSV, JSON
LABELS = {
    PLAIN: "plain decoding (reference)",
    EAGLE2: "MSD baseline (EAGLE-2 tree)",
    OPT: "+ OPT-Tree",
    CALIBRATED: "+ OPT-Tree + calibrator",
}
FITTED, ONLINE = "fitted", "online"  # where the calibrated row's calibrator comes from


@dataclass(frozen=True)
class Row:
    """One row of the table: the model_args it adds to the user's."""

    key: str  # PLAIN, EAGLE2, OPT or CALIBRATED
    label: str  # the thesis's name
    model_args: str


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    shared: str  # model_args of every row, plain decoding's included
    rows: tuple[Row, ...]  # plain first; the calibrated row (last) lacks its calibrator (`calibrator_args`)
    calibrator: str  # FITTED: the calibrator fitted for the pair when there is one, else online; ONLINE: always online
    train_ratio: float  # online calibration's observed share of each run's requests
    online_args: str  # model_args of the online calibrator (label, groups), with calibrator=online only
    notes: tuple[str, ...]  # where the settings come from, and what the plugin cannot reproduce

    def row_names(self) -> set[str]:
        """Every model_arg name a row of this preset sets (the user's --model_args may not set them)."""
        parts = [self.shared, self.online_args, *(r.model_args for r in self.rows)]
        return {a.split("=", 1)[0].strip() for p in parts for a in p.split(",") if a.strip()}

    def online(self, train_ratio: float) -> str:
        """The calibrated row's calibrator model_args for online calibration."""
        return ",".join(a for a in (f"calibrator=online,train_ratio={train_ratio:g}", self.online_args) if a)

    def table_rows(self, calibrator_args: str, shared: str | None = None) -> list[Row]:
        """The rows with every model_arg they pass: the shared ones (`shared` replaces the preset's, e.g.
        another prompt for a pair trained on it), their own, and the calibrated row's calibrator
        (`calibrator_args`, e.g. "calibrator=/abs/c.json" or `online(...)`)."""
        shared = self.shared if shared is None else shared
        out = []
        for row in self.rows:
            own = f"{row.model_args},{calibrator_args}" if row.key == CALIBRATED else row.model_args
            out.append(Row(row.key, row.label, ",".join(a for a in (shared, own) if a)))
        return out


def _rows(eagle2: str, opt: str, calibrated: str) -> tuple[Row, ...]:
    return (
        Row(PLAIN, LABELS[PLAIN], "use_msd=false"),
        # use_msd=true: the plugin's default (auto) would decode every row plainly where no tree pays (a CPU)
        Row(EAGLE2, LABELS[EAGLE2], f"use_msd=true,{eagle2}"),
        Row(OPT, LABELS[OPT], f"use_msd=true,{opt},calibrator=none"),
        Row(CALIBRATED, LABELS[CALIBRATED], f"use_msd=true,{calibrated}"),
    )


THESIS_OPT = "tree=opt,opt_variant=upstream,node_budget=499,stop_delta=0.2,max_depth=10,top_k=10"
THESIS = Preset(
    name="thesis",
    summary="the thesis's own settings: EAGLE-2 as in MSD, OPT-Tree with nodes 500 / threshold 0.2 / max_depth 10 / "
    "frontier 10, the calibrator as a logit tilt, fitted online on the first 0.2 of the requests, MSD's prompt",
    shared="conv_template=msd",
    rows=_rows(
        eagle2="tree=eagle2,total_tokens=59,depth=5,top_k=10",
        opt=THESIS_OPT,
        calibrated=f"{THESIS_OPT},calibrator_mode=tilt",
    ),
    calibrator=ONLINE,
    train_ratio=0.2,
    online_args="calibrator_label=soft,attention_bins=5,min_group_size=200,depth_edges=none",
    notes=(
        (
            "Files are the thesis repository's (ljc0359/Speculative-Decoding-For-Vision-Language-Model at e85f00d): "
            "cnets.py and calibrators.py under EAGLE/eagle/model/, llava_msd_calibrated.py under lmms-eval/lmms_eval/models/."
        ),
        (
            "Prompt: vicuna_v1 with an empty system prompt (llava_msd_calibrated.py 554-559, `conv.system = \"\"`), "
            "MSD's own: conv_template=msd."
        ),
        (
            "MSD baseline: EAGLE-2 with upstream's total_tokens 59 / depth 5 / top_k 10 (EaModel.from_pretrained's "
            "defaults, ea_model.py 100-102). MSD's and the thesis's lmms-eval models pass total_token=-1 "
            "(llava_msd_calibrated.py 114), which picks the size per GPU by timing (ea_model.py 156-179)."
        ),
        (
            "+ OPT-Tree: topK_genrate's defaults nodes=500, threshold=0.2, max_depth=10 (cnets.py 944-946; its callers, "
            "utils.py 255-266 and 551-577, pass none of them). nodes counts the root: node_budget=499 (cnets.py 981); it "
            "never binds, since at most 10 levels of top_k=10 nodes are stored (cnets.py 1066-1068). Frontier and "
            "branching are top_k=10 (cnets.py 988; ea_model.py 102). Each level keeps only its best top_k of the "
            "top_k x top_k children (cnets.py 1213-1225), the stop compares the best-499 weight sum over the levels "
            "before the newest with the previous one (cnets.py 1401-1412), and the tree is taken from those levels "
            "(cnets.py 1432-1437): OPT-Tree's own rule, opt_variant=upstream (except that at max_depth the thesis "
            "keeps the newest level)."
        ),
        (
            "+ calibrator: calibrator_mode=tilt (lmms_msd.calibration.scorer.TiltScorer: the formulas with their lines, "
            "base alpha 1). Fitted online on the first train_ratio=0.2 of the requests (the gen_kwargs default, "
            "llava_msd_calibrated.py 315), which decode without it; soft labels min(1, p_target / p_draft) "
            "(calibrators.py 574-583 and 803: target=\"soft\"), token type x 5 attention quantile bins, 200 samples "
            "per group (calibrators.py 59-66, 826-831)."
        ),
        (
            "Not reproduced: the thesis observes the requests in lmms-eval's order (longest prompt first, "
            "llava_msd_calibrated.py 413-436), here a seeded random order; it labels every proposed child of every "
            "level through extra target forwards on the child's path (cnets.py 669-716), here the children of "
            "accepted nodes from the verification logits; it resets its acceptance counters after the observed "
            "requests (llava_msd_calibrated.py 446-450), so its alpha covers the other 80%, here every request; its "
            "draft attends, within the tree, to itself and to every node of the earlier levels (tree_mask = eye, "
            "never updated: cnets.py 1181-1193 and 164-170), here to its ancestors only; below depth 1 its "
            "calibrator features exponentiate probabilities (confidence e^p, margin e^p1 - e^p2; cnets.py 1272, "
            "785-801), here p and p1 - p2 at every depth; its tilt's attention comes from rows unrelated to the "
            "node (TiltScorer's docstring), here from the node's parent's row."
        ),
    ),
)

TUNED = Preset(
    name="tuned",
    summary="this project's settings, tuned on the bundled pair (the plugin's defaults; README model_args table)",
    shared="",
    rows=_rows(
        eagle2="tree=eagle2,total_tokens=59,depth=5,top_k=10",
        opt="tree=opt,opt_variant=frontier,node_budget=60,stop_delta=0.3,max_depth=10,top_k=10",
        calibrated="tree=opt,opt_variant=frontier,node_budget=60,stop_delta=0.3,max_depth=10,top_k=10,calibrator_mode=weight",
    ),
    calibrator=FITTED,
    train_ratio=0.3,
    online_args="",
    notes=(
        (
            "The calibrated row uses the calibrator fitted for the pair (calibrators/miniature.json for the bundled "
            "one; `lmms-msd calibrate`), or online calibration on 0.3 of each run's requests (label auto: the one "
            "with the lower held-out Brier score) when there is none; its prediction is the node's weight."
        ),
    ),
)

PRESETS = {p.name: p for p in (THESIS, TUNED)}
DEFAULT = THESIS.name


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]
