"""Many generations in flight at once: continuous batching over a `BatchedRuntime`.

`generate_batched` keeps up to `max_batch` requests live. Every step runs one target forward for all
of them (`BatchedRuntime.forward_next_batch` for plain decoding, `verify_trees` over every row's
tree for speculative decoding); then each row accepts, commits and checks its stop on its own, exactly
as `lmms_msd.speculative.decoding`'s one-request loops do (the same acceptance rules, `record_step`
and `Stopper`; the rows' stop checks decode their texts together, `record_steps`). A finished request
leaves at once and the next waiting one joins (the prompts joining at once prefilled together), so the
batch stays full while requests remain.

The host's work per step does not grow with the rows on the device side: the trees are padded into
one batch with a fixed number of device operations (`pad_trees`), the greedy rows all accept at once
on the device (`accept_greedy_rows`: `accept_greedy`'s outcome, one read from the device for every
row), and their paths, committed tokens and hidden states stay on the device for the commit. Sampled
rows accept row by row on the device (`sample_tree`, each with its own generator), read together in one read.

What keeps rows apart: each row has its own caches and committed length on the runtime (ragged:
`lmms_msd.speculative.runtime`), its own stopping rule and its own seeded `torch.Generator`, from
which only its own draws are taken, in the order its one-request loop takes them. So a request decodes
the same tokens at any batch size as alone, greedy or sampling with the same seed, up to
floating-point rounding of the batched forward (which changes a token only where two logits, or a
draw and a boundary, lie within rounding of each other).

Tree size per batch (`TreeSchedule`): with B rows in flight a step verifies B trees at once, so
large trees cost more at large B. A schedule maps a request's tree spec and B to the spec grown this
step, or None for a plain step (the root alone: no draft forward, the bonus only). A row on plain
steps leaves its draft behind and catches it up in one draft forward before its next tree; a step
where no row grows a tree is plain decoding's batched step. So a schedule that turns trees off at
large B makes speculative decoding cost what plain decoding costs there. A row's draft starts (reads
its prompt, `prefill_draft`) only before the row's first tree, so a request decoded on plain steps from
start to end never runs the draft at all: the draft's prompt forward (2.3 ms a request on the H200's
7B-shaped testbed, `benchmarks/h200_7b_batch_default/`) is paid only by the requests that use it.
`NodeBudgets` is a fixed
table by batch size; a cost model's choice per batch size plugs in at the same place (not done yet:
`lmms_msd.speculative.cost` times batch-1 steps only).

    runtime = EagerRuntime(target, draft)
    requests = [BatchRequest(prompt, GenerationConfig(), tree=EagleTree()) for prompt in prompts]
    for index, result in generate_batched(runtime, requests, max_batch=16):
        ...
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from lmms_msd.models.target import EmbeddedPrompt
from lmms_msd.speculative.decoding import (
    DecodeStats,
    GenerationResult,
    StepObserver,
    _check_prompt,
    _synchronize,
    record_steps,
)
from lmms_msd.speculative.drafting import DraftRows
from lmms_msd.speculative.runtime import (
    BatchedRuntime,
    PrefillError,
    Sequence,
    TreeOutputs,
)
from lmms_msd.speculative.sampling import GenerationConfig, next_token
from lmms_msd.speculative.stopping import Stopper, first_stops
from lmms_msd.speculative.transfer import to_device
from lmms_msd.speculative.tree import Tree, TreeSpec, narrowed
from lmms_msd.speculative.verify import (
    Acceptance,
    GrownTrees,
    PaddedTrees,
    accept_greedy_rows,
    pad_trees,
    read_sampled,
    sample_tree,
)

__all__ = ["PLAIN_FROM", "BatchRequest", "NodeBudgets", "PlainFrom", "TreeSchedule", "generate_batched", "same_tree"]

# A request's tree spec and the number of rows in flight -> the spec to grow this step, or None for a
# plain step (the root alone). It may only shrink a tree: a request's cache room is its own spec's.
TreeSchedule = Callable[[TreeSpec, int], "TreeSpec | None"]


def same_tree(spec: TreeSpec, batch: int) -> TreeSpec:
    """The `TreeSchedule` that grows every request's own tree at every batch size."""
    return spec


@dataclass(frozen=True)
class NodeBudgets:
    """A `TreeSchedule` by batch size: with B rows in flight, the node budget of the largest listed batch
    size at most B (capped by the request's own budget); a budget of 0 makes plain steps.

    Example: NodeBudgets(((1, 60), (16, 20), (64, 0))) grows up to 60 nodes at B = 1..15, 20 at 16..63
    and no tree (plain steps) from 64 rows on. A smaller budget also narrows the growth (`narrowed`).
    """

    budgets: tuple[tuple[int, int], ...]  # (batch size, node budget), batch sizes ascending from 1

    def __post_init__(self) -> None:
        sizes = [b for b, _ in self.budgets]
        if not sizes or sizes[0] != 1 or sizes != sorted(set(sizes)) or any(n < 0 for _, n in self.budgets):
            raise ValueError(
                f"node budgets {list(self.budgets)}: (batch size, budget) pairs with batch sizes ascending from 1 "
                "and budgets >= 0, e.g. 1:60,16:20,64:0"
            )

    @classmethod
    def parse(cls, text: str) -> NodeBudgets:
        """From "B:N,B:N,...", e.g. "1:60,16:20,64:0"; ";" separates as well (lmms-eval's --model_args
        splits on commas: batch_node_budgets=1:60;16:20;64:0)."""
        try:
            pairs = tuple((int(b), int(n)) for b, n in (item.split(":") for item in re.split("[,;]", text)))
        except ValueError as error:
            raise ValueError(f"node budgets {text!r}: write batch:budget pairs, e.g. 1:60,16:20,64:0") from error
        return cls(pairs)

    def budget(self, batch: int) -> int:
        return [n for b, n in self.budgets if b <= batch][-1]

    def __call__(self, spec: TreeSpec, batch: int) -> TreeSpec | None:
        budget = min(self.budget(batch), spec.node_budget)
        if budget == 0:
            return None
        return spec if budget == spec.node_budget else narrowed(spec, budget)


@dataclass(frozen=True)
class PlainFrom:
    """A `TreeSchedule`: each request's own tree while fewer than `batch` rows are in flight, plain steps
    (the root alone, no draft forward) from `batch` rows on.

    `PLAIN_FROM` is the plugin's default schedule (with `use_msd=auto`, from 8 requests at once the plugin
    decodes plainly instead: the trees of a run's last steps cost more than they saved there,
    `benchmarks/h200_7b_batch_default/`). Measured on one H200, 7B-shaped testbed, long-answer requests,
    EAGLE-2 with the pair retrained on generator version 3 (`benchmarks/h200_7b_batch/retrained_v3/`, 32
    requests): speculative decoding gives 341-404 tokens/s at batch 1 against plain decoding's 164, 608-651
    at batch 4 against 470, but at most 643 at batch 16 against 943 and 727 at batch 32 against 1542
    (trees are drafted row after row, so drafting costs B times one row's). So trees pay at 4 rows and
    lose from 16; 8, between the two, was not measured. (With the previous draft, tau 3.9 instead of
    5.5, trees already lost at 4: `benchmarks/h200_7b_batch/after_row_graphs/`.)
    Example: PlainFrom(4)(EagleTree(), 3) is EagleTree(); PlainFrom(4)(EagleTree(), 4) is None.
    """

    batch: int

    def __post_init__(self) -> None:
        if self.batch < 2:
            raise ValueError(f"PlainFrom needs a batch size >= 2 (from 1 on, every step is plain: use_msd=false), got {self.batch}")

    def __call__(self, spec: TreeSpec, batch: int) -> TreeSpec | None:
        return spec if batch < self.batch else None


PLAIN_FROM = PlainFrom(8)


@dataclass(eq=False)
class BatchRequest:
    """One generation for `generate_batched`: the arguments of `plain_generate` / `speculative_generate`."""

    prompt: EmbeddedPrompt
    config: GenerationConfig
    generator: torch.Generator | None = None  # its own; None when greedy
    name: str = ""  # names it in errors ["request <its index>"]
    tree: TreeSpec | None = None  # None: plain decoding (every request of one call decodes alike)
    observer: StepObserver | None = None  # speculative: called after each of its verifications
    track_visual: bool = False  # speculative: the draft measures visual attention (`speculative_generate`)


@dataclass(eq=False)
class _Row:
    """A request in flight: its runtime sequence and everything its own loop would hold."""

    index: int  # its place in the requests
    request: BatchRequest
    sequence: Sequence
    stopper: Stopper
    stats: DecodeStats
    tokens: list[int]  # committed so far; the last is fed next (plain) or is the next tree's root
    wall_s: float = 0.0  # its share of the loop's time so far (`generate_batched`)
    root: DraftRows | None = None  # speculative: the draft's output at the root (stale while `behind` holds steps)
    # speculative, until the row first grows a tree: what its draft's prefill reads (the prompt, the target's
    # hidden over it); a row that never grows one (plain steps all along) never runs its draft
    unstarted: tuple[EmbeddedPrompt, torch.Tensor] | None = None
    # speculative: steps the draft has not advanced over (plain steps: no tree needed it), oldest first:
    # each the committed tokens [m] that follow its committed positions and the target's hidden there [m, H]
    behind: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    done: bool = False

    def result(self) -> GenerationResult:
        self.stats.wall_s = self.wall_s
        self.stats.new_tokens = len(self.tokens)
        return GenerationResult(self.stopper.text(self.tokens), self.tokens, self.stats)


@torch.inference_mode()
def generate_batched(
    runtime: BatchedRuntime,
    requests: Iterable[BatchRequest],
    max_batch: int,
    schedule: TreeSchedule = same_tree,
) -> Iterator[tuple[int, GenerationResult]]:
    """Decode the requests with up to `max_batch` in flight; yields (index in `requests`, result) as each
    finishes (not in order). `requests` is read lazily, one when a row frees, so a request's prompt
    can be prepared just before it joins. Every request decodes plainly (tree None) or every one
    speculatively. A request's stats.wall_s is its share of the loop's time: its prefill forward's time
    divided among the prompts that joined with it, and each step's time divided among the rows in flight,
    so the requests' wall_s add up to the loop's time and their summed tokens over summed wall_s is the
    batch's throughput (prefill_s likewise: its share of its prefill); no per-phase profile.
    schedule: the tree grown per request and batch size (`TreeSchedule`; speculative only)
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if runtime.max_batch is not None and max_batch > runtime.max_batch:
        raise ValueError(f"max_batch={max_batch} but this {type(runtime).__name__} holds {runtime.max_batch} sequences at once")
    waiting = enumerate(requests)
    live: list[_Row] = []
    speculative: bool | None = None  # set by the first request
    try:
        while True:
            # 1. join: waiting requests take the free rows, prefilled together (`BatchedRuntime.prefill_batch`)
            while len(live) < max_batch:
                joining = list(itertools.islice(waiting, max_batch - len(live)))
                if not joining:
                    break
                for index, request in joining:
                    if speculative is None:
                        speculative = request.tree is not None
                    if (request.tree is not None) != speculative:
                        raise ValueError(
                            f"request {index} decodes {'speculatively' if request.tree is not None else 'plainly'} but the "
                            "first one did not: every request of one generate_batched call decodes alike"
                        )
                for row in _start(runtime, joining):
                    if row.done:
                        runtime.release(row.sequence)
                        yield row.index, row.result()
                    else:
                        live.append(row)
            if not live:
                return
            # 2. one step for every row: one target forward
            started = time.perf_counter()
            if speculative:
                _speculative_step(runtime, live, schedule)
            else:
                _plain_step(runtime, live)
            share = (time.perf_counter() - started) / len(live)  # the step read its outcome on the host: it is over
            for row in live:
                row.wall_s += share
            # 3. leave: finished rows free their place
            finished = [row for row in live if row.done]
            live = [row for row in live if not row.done]
            for row in finished:
                runtime.release(row.sequence)
            for row in finished:
                yield row.index, row.result()
    finally:  # however the loop ends (an error, the caller stopping early), the rows in flight are given back
        for row in live:
            runtime.release(row.sequence)


def _start(runtime: BatchedRuntime, joining: list[tuple[int, BatchRequest]]) -> list[_Row]:
    """Prefill the joining requests together and choose each one's first token, as its one-request loop
    does; each is charged an equal share of the time."""
    target = runtime.target
    for index, request in joining:
        try:
            _check_prompt(target, request.prompt)
        except ValueError as error:
            raise ValueError(f"{request.name or f'request {index}'}: {error}") from error
    start = time.perf_counter()
    extras = [r.config.max_new_tokens + (r.tree.slots if r.tree is not None else 0) for _, r in joining]
    try:
        started = runtime.prefill_batch([r.prompt for _, r in joining], extras)
    except PrefillError as error:
        index, request = joining[error.position]
        raise ValueError(f"{request.name or f'request {index}'}: {error}") from error
    rows = []
    for (index, request), (sequence, hidden, logits) in zip(joining, started):
        config, tree = request.config, request.tree
        token = next_token(logits, config, request.generator)
        stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
        row = _Row(index, request, sequence, stopper, DecodeStats(speculative=tree is not None), [token])
        if tree is not None:  # the draft reads the prompt when the row first grows a tree (`_catch_up`)
            row.unstarted = (request.prompt, hidden)
        row.done = stopper.first_stop(row.tokens, 0) is not None
        rows.append(row)
    _synchronize(target.device)
    share = (time.perf_counter() - start) / len(rows)
    for row in rows:
        row.stats.prefill_s = row.wall_s = share
    return rows


def _plain_step(runtime: BatchedRuntime, live: list[_Row]) -> None:
    """Feed every row's last token in one forward and choose each row's next."""
    device = runtime.target.device
    fed = to_device([row.tokens[-1] for row in live], device)
    logits = runtime.forward_next_batch([row.sequence for row in live], fed)[1]  # [B, V]
    argmax = logits.argmax(dim=-1).tolist()  # the greedy rows' tokens, in one read
    for b, row in enumerate(live):
        config = row.request.config
        token = argmax[b] if config.greedy else next_token(logits[b], config, row.request.generator)
        row.tokens.append(token)
        row.stats.steps += 1
        row.stats.accepted.append(0)
    stops = first_stops([(row.stopper, row.tokens, len(row.tokens) - 1) for row in live])  # every row's text at once
    for row, stop in zip(live, stops):
        row.done = stop is not None


def _speculative_step(runtime: BatchedRuntime, live: list[_Row], schedule: TreeSchedule) -> None:
    """Draft every row's tree, verify them all in one forward, accept, stop or commit row by row.

    A row whose schedule says plain step verifies its root alone and leaves its draft behind; the draft
    catches up over all the steps it missed, in one forward, before the row's next tree (`_Row.behind`).
    Greedy rows accept all at once on the device, with one read for all of them (`_accept_rows`).
    """
    device = runtime.target.device
    # 1. this step's trees: grown as scheduled for this batch size (the draft caught up first), or the root alone
    scheduled: dict[int, TreeSpec | None] = {}  # by the request spec's id: asked once per distinct spec (requests share one)
    specs = [_scheduled(scheduled, schedule, row.request.tree, len(live)) for row in live]
    grown = [b for b, spec in enumerate(specs) if spec is not None]
    if not grown and all(row.request.observer is None for row in live):
        _plain_steps(runtime, live)
        return
    _catch_up(runtime, [live[b] for b in grown if live[b].behind or live[b].unstarted is not None])
    drafted = runtime.draft_trees(
        [live[b].sequence for b in grown], [specs[b] for b in grown], [live[b].tokens[-1] for b in grown],
        [live[b].root for b in grown],
    )  # fmt: skip
    plain = [b for b, spec in enumerate(specs) if spec is None]
    if not plain and isinstance(drafted, GrownTrees):  # grown side by side: padded as they are
        trees, padded = drafted, drafted.padded()
    else:
        by_row = dict(zip(grown, drafted))
        by_row.update(zip(plain, root_only([live[b].tokens[-1] for b in plain], [live[b].request.track_visual for b in plain], device)))
        trees = [by_row[b] for b in range(len(live))]
        padded = pad_trees([t for t, _ in trees], [a for _, a in trees])
    # 2. verify every tree in one target forward
    outs = runtime.verify_trees([row.sequence for row in live], padded)
    # 3. per row: accept, observe, stop, or commit the accepted path
    kept = []
    outcomes = _accept_rows(live, trees, padded, outs)
    for b, (row, (result, *_)) in enumerate(zip(live, outcomes)):
        if row.request.observer is not None:
            row.request.observer(trees[b][0], outs.row(b)[1], result)
    # every row's committed tokens and stop check (their texts decoded together)
    stopped = record_steps([(row.tokens, row.stats, row.stopper, result) for row, (result, *_) in zip(live, outcomes)])
    for b, (row, done, (_, path, committed, path_hidden)) in enumerate(zip(live, stopped, outcomes)):
        if done:
            row.done = True
            continue
        # a row whose draft waits keeps its own copy (not a view pinning the whole step's gather)
        row.behind.append((committed, path_hidden if specs[b] is not None else path_hidden.clone()))
        kept.append((b, row, path))
    if not kept:
        return
    runtime.keep_batch([row.sequence for _, row, _ in kept], [path for _, _, path in kept])
    # 4. the draft advances now where this step grew a tree (as the one-request loop), later elsewhere
    _catch_up(runtime, [row for b, row, _ in kept if specs[b] is not None])


def _scheduled(seen: dict[int, TreeSpec | None], schedule: TreeSchedule, spec: TreeSpec, batch: int) -> TreeSpec | None:
    key = id(spec)
    if key not in seen:
        seen[key] = schedule(spec, batch)
    return seen[key]


def _accept_rows(
    live: list[_Row], trees: GrownTrees | list[tuple[Tree, torch.Tensor]], padded: PaddedTrees, outs: TreeOutputs
) -> list[tuple[Acceptance, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each row's outcome as its one-request loop's `accept` gives it, with its path [a + 1], committed
    tokens [a + 1] (the accepted ones, then the bonus) and the target's hidden there [a + 1, H] on the device.

    Greedy rows: `accept_greedy_rows` over the whole batch, one read for all of them, their paths and
    tokens taken from its device tensors and their hidden in one gather. Sampling rows: `sample_tree`
    row by row with the row's own generator (the same draws as alone), all read in one read, their paths
    and tokens kept from the device tensors.
    """
    outcomes: list = [None] * len(live)
    greedy = [b for b, row in enumerate(live) if row.request.config.greedy]
    if greedy:
        rows = accept_greedy_rows(padded, outs.argmax())  # every row's, the sampled ones unused
        longest = max(len(rows.results[b].path) for b in greedy)
        hidden = outs.path_hidden(rows.paths[:, :longest])  # [B, longest, H]
        for b in greedy:
            a1 = len(rows.results[b].path)
            outcomes[b] = (rows.results[b], rows.path(b), rows.committed(b), hidden[b, :a1])
    sampled = [b for b, row in enumerate(live) if not row.request.config.greedy]
    if sampled:
        drawn = [sample_tree(trees[b][0], outs.row(b)[1], trees[b][1], live[b].request.config, live[b].request.generator) for b in sampled]
        read = torch.cat(drawn).tolist()  # one read for all sampling rows
        offset = 0
        for b, on_device in zip(sampled, drawn):
            result = read_sampled(read[offset : offset + on_device.shape[0]])
            offset += on_device.shape[0]
            a1, n = len(result.path), len(trees[b][0])
            path, committed = on_device[:a1], torch.cat([on_device[n + 1 : n + a1], on_device[-1:]])
            outcomes[b] = (result, path, committed, outs.row(b)[0][path])
    return outcomes


def _plain_steps(runtime: BatchedRuntime, live: list[_Row]) -> None:
    """A speculative step where no row grows a tree: each row's root alone, verified as plain decoding's
    step (`forward_next_batch`: no tree masks, one read), accepted as a root-only tree would be (the
    bonus: argmax, or drawn from the processed distribution), its draft left behind."""
    device = runtime.target.device
    fed = to_device([row.tokens[-1] for row in live], device)
    hidden, logits = runtime.forward_next_batch([row.sequence for row in live], fed)  # [B, H], [B, V]
    best = logits.argmax(dim=-1)
    argmax = best.tolist()
    chosen = []
    for b, row in enumerate(live):
        config = row.request.config
        chosen.append(argmax[b] if config.greedy else next_token(logits[b], config, row.request.generator))
    stopped = record_steps([(row.tokens, row.stats, row.stopper, Acceptance([0], token, [])) for row, token in zip(live, chosen)])
    for row, done in zip(live, stopped):
        row.done = done
    committed = best if chosen == argmax else to_device(chosen, device)  # all greedy: no copy back
    for b, row in enumerate(live):
        if not row.done:
            row.behind.append((committed[b : b + 1], hidden[b : b + 1]))


def _catch_up(runtime: BatchedRuntime, rows: list[_Row]) -> None:
    """Advance the rows' drafts over every step they are behind, in one call: their new roots. A row whose
    draft has not started reads its prompt first (`prefill_draft`, with the row's first token: as its
    one-request loop does at the start), then advances with the others over the steps since."""
    for row in rows:
        if row.unstarted is not None:
            prompt, hidden = row.unstarted
            row.root = runtime.prefill_draft(row.sequence, prompt, hidden, row.tokens[0], row.request.track_visual)
            row.unstarted = None
    rows = [row for row in rows if row.behind]
    if not rows:
        return
    # one step behind (a tree every step): its tensors as they are, no copy per row
    tokens = [torch.cat([t for t, _ in row.behind]) if len(row.behind) > 1 else row.behind[0][0] for row in rows]
    hidden = [torch.cat([h for _, h in row.behind]) if len(row.behind) > 1 else row.behind[0][1] for row in rows]
    for row, root in zip(rows, runtime.advance_batch([row.sequence for row in rows], tokens, hidden)):
        row.root = root
        row.behind.clear()


def root_only(tokens: list[int], track_visual: list[bool], device: torch.device) -> list[tuple[Tree, torch.Tensor]]:
    """Plain steps' trees: each the root alone (no draft node), as OPT-Tree's stop "cost" builds when no
    tree pays, and its ancestor mask [1, 1]. One copy to the device for all of them; the trees share
    their constant tensors (a tree is never written to)."""
    if not tokens:
        return []
    ids = to_device(tokens, device)
    parents = torch.full((1,), -1, dtype=torch.long, device=device)
    depths = torch.zeros(1, dtype=torch.long, device=device)
    zeros = torch.zeros(1, dtype=torch.float32, device=device)
    ones = torch.ones(1, dtype=torch.float32, device=device)
    ancestors = torch.ones(1, 1, dtype=torch.bool, device=device)
    return [
        (Tree(ids[b : b + 1], parents, depths, zeros, ones, zeros if track else None), ancestors)
        for b, track in enumerate(track_visual)
    ]
