"""Batched greedy acceptance (`accept_greedy_rows` over `pad_trees`) is `accept_greedy` row by row, and a
batched greedy step reads the device once and runs a fixed number of device operations whatever B."""

from __future__ import annotations

import pytest
import torch
from test_batching import (
    N_REQUESTS,
    TREES,
    greedy_configs,
    mixed_requests,
    one_at_a_time,
    pair,
)
from test_fast_engine import capture_rules  # noqa: F401  (autouse fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from lmms_msd.speculative.batching import BatchRequest, generate_batched
from lmms_msd.speculative.fast.batched_engine import BatchedStaticEngine
from lmms_msd.speculative.fast.graphs import bucket
from lmms_msd.speculative.runtime import EagerRuntime
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import GrownTrees, accept_greedy, accept_greedy_rows, pad_trees


def random_tree(g: torch.Generator, vocab: int, distinct: bool) -> Tree:
    """1 to 30 nodes; siblings carry distinct tokens when `distinct`, else repeats are likely (a small
    vocabulary), so that equally deep accepted nodes occur and the tie rule is exercised."""
    n = int(torch.randint(1, 30, (1,), generator=g))
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    tokens, used = [int(torch.randint(0, vocab, (1,), generator=g))], {}
    for i in range(1, n):
        taken = used.setdefault(parents[i], set())
        free = [t for t in range(vocab) if t not in taken or not distinct] or [0]
        token = free[int(torch.randint(0, len(free), (1,), generator=g))]
        taken.add(token)
        tokens.append(token)
    return Tree(tokens=torch.tensor(tokens), parents=torch.tensor(parents), depths=torch.tensor(depths), scores=torch.zeros(n))


def test_batched_greedy_acceptance_is_accept_greedy_row_by_row():
    g = torch.Generator().manual_seed(0)
    vocab = 4
    root_only = ties = 0
    for trial in range(150):
        batch = int(torch.randint(1, 7, (1,), generator=g))
        trees = [random_tree(g, vocab, distinct=trial % 2 == 0) for _ in range(batch)]
        ancestors = [tree.ancestor_mask(int(tree.depths.max()) + 1) for tree in trees]
        # integer logits in 0..2: the argmax is often a tie, which both take as the first maximal token
        logits = [torch.randint(0, 3, (len(tree), vocab), generator=g).float() for tree in trees]
        padded = pad_trees(trees, ancestors)
        width = padded.tokens.shape[1]
        best = torch.stack([torch.cat([x.argmax(dim=-1), torch.full((width - x.shape[0],), 3)]) for x in logits])
        rows = accept_greedy_rows(padded, best)
        for b, (tree, mask, x) in enumerate(zip(trees, ancestors, logits)):
            expected = accept_greedy(tree, x, mask)
            result = rows.results[b]
            where = f"trial {trial}, row {b}"
            assert (result.path, result.path_tokens, result.bonus) == (expected.path, expected.path_tokens, expected.bonus), where
            assert rows.path(b).tolist() == expected.path, where
            assert rows.committed(b).tolist() == expected.path_tokens + [expected.bonus], where
            root_only += len(tree) == 1
            ties += int((x == x.max(dim=-1, keepdim=True).values).sum(dim=-1).gt(1).any())
    assert root_only > 10 and ties > 100  # both cases were met


def test_padded_trees_hold_each_row_in_place():
    g = torch.Generator().manual_seed(1)
    trees = [random_tree(g, 6, distinct=True) for _ in range(5)]
    ancestors = [tree.ancestor_mask(int(tree.depths.max()) + 1) for tree in trees]
    padded = pad_trees(trees, ancestors)
    width = max(len(tree) for tree in trees)
    assert padded.tokens.shape == (5, width) and padded.ancestors.shape == (5, width, width)
    for b, (tree, mask) in enumerate(zip(trees, ancestors)):
        n = len(tree)
        assert padded.counts[b] == n and padded.valid[b].tolist() == [True] * n + [False] * (width - n)
        assert padded.tokens[b, :n].tolist() == tree.tokens.tolist() and not padded.tokens[b, n:].any()
        assert padded.parents[b, :n].tolist() == tree.parents.tolist() and (padded.parents[b, n:] == -1).all()
        assert padded.depths[b, :n].tolist() == tree.depths.tolist() and not padded.depths[b, n:].any()
        assert torch.equal(padded.ancestors[b, :n, :n], mask) and padded.ancestors[b].sum() == mask.sum()


def test_grown_trees_pad_as_pad_trees_pads_their_rows():
    """`GrownTrees` (a batched grower's trees side by side, anything past a row's nodes) gives each row's
    tree and mask as its first counts[b] places, and `padded()` is `pad_trees` over those rows."""
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        trees = [random_tree(g, 6, distinct=True) for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
        ancestors = [tree.ancestor_mask(int(tree.depths.max()) + 1) for tree in trees]
        counts, width = [len(t) for t in trees], max(len(t) for t in trees)
        fields = []
        for name in ("tokens", "parents", "depths", "scores"):
            side = torch.randint(-5, 50, (len(trees), width), generator=g).to(getattr(trees[0], name).dtype)  # garbage past
            for b, tree in enumerate(trees):
                side[b, : len(tree)] = getattr(tree, name)
            fields.append(side)
        masks = torch.randint(0, 2, (len(trees), width, width), generator=g).bool()
        for b, mask in enumerate(ancestors):
            masks[b, : counts[b], : counts[b]] = mask
        grown = GrownTrees((*fields, fields[3].exp(), None), masks, counts)
        for b, (tree, mask) in enumerate(grown):
            assert torch.equal(tree.tokens, trees[b].tokens) and torch.equal(tree.parents, trees[b].parents)
            assert torch.equal(mask, ancestors[b]) and tree.visual is None
        expected, padded = pad_trees(trees, ancestors), grown.padded()
        for name in ("tokens", "parents", "depths", "ancestors", "sizes"):
            assert torch.equal(getattr(padded, name), getattr(expected, name)), name
        assert padded.counts == expected.counts


class Watched:
    """A runtime whose batched steps are watched: a window opens where the loop pads a step's trees and
    closes at the next runtime call other than the step's own `verify_trees` and `keep_batch` (drafting,
    a prefill, a release); each window counts the reads from the device (`Tensor.tolist`, `.item`, ...),
    the device operations other than views, and the rows verified."""

    READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")

    def __init__(self, runtime, monkeypatch) -> None:
        self._runtime = runtime
        self.windows: list[dict] = []
        self.open = False
        from lmms_msd.speculative import batching

        def counted(name, original):
            def read(tensor, *args, **kwargs):
                if self.open:
                    self.windows[-1]["reads"] += 1
                return original(tensor, *args, **kwargs)

            return read

        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        pad = batching.pad_trees

        def opening(trees, ancestors):
            self.windows.append({"reads": 0, "ops": 0, "rows": len(trees), "kept": False})
            self.open = True
            return pad(trees, ancestors)

        monkeypatch.setattr(batching, "pad_trees", opening)
        padded = GrownTrees.padded

        def opening_grown(trees):  # trees grown side by side (batched drafting) are padded as they are
            self.windows.append({"reads": 0, "ops": 0, "rows": len(trees), "kept": False})
            self.open = True
            return padded(trees)

        monkeypatch.setattr(GrownTrees, "padded", opening_grown)

    def __getattr__(self, name):
        value = getattr(self._runtime, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            if name not in ("verify_trees", "keep_batch"):
                self.open = False
            if self.open and name == "keep_batch":
                self.windows[-1]["kept"] = True
            if self.open and name == "verify_trees" and hasattr(args[0][0], "row"):  # a static engine's cache rows
                self.windows[-1]["cache_rows"] = [sequence.row for sequence in args[0]]
            return value(*args, **kwargs)

        return call


class CountOps(TorchDispatchMode):
    """Counts the device operations (views aside) dispatched inside a `Watched` window."""

    def __init__(self, watched: Watched) -> None:
        super().__init__()
        self.watched = watched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.watched.open and not func.is_view:
            self.watched.windows[-1]["ops"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("engine", ["eager", "static", "static_batched_drafting"])
def test_a_greedy_batched_step_reads_the_device_once(engine, monkeypatch):
    """From padding the trees to keeping the paths (verification, acceptance of every row, the kept
    path's hidden states): one read from the device per step, whatever the rows in flight; on the
    static engine a fixed number of device operations as well (no per-row loop)."""
    target, draft = pair("following")
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    if engine == "eager":
        runtime = EagerRuntime(target, draft)
    else:
        runtime = BatchedStaticEngine(target, draft, max_batch=4, max_length=256, batched_drafting=engine == "static_batched_drafting")
    watched = Watched(runtime, monkeypatch)
    requests = [BatchRequest(p, c, tree=TREES["eagle2"]) for p, c in zip(prompts, configs)]
    with CountOps(watched):
        results = dict(generate_batched(watched, requests, max_batch=4))
    alone = [one_at_a_time(EagerRuntime(target, draft), p, c, TREES["eagle2"]) for p, c in zip(prompts, configs)]
    assert [results[i].token_ids for i in range(N_REQUESTS)] == [r.token_ids for r in alone]
    steps = watched.windows
    assert {step["reads"] for step in steps} == {1}, [step["reads"] for step in steps]
    assert len({step["rows"] for step in steps}) >= 3  # rows joined and left
    if engine != "eager":
        kept = [step for step in steps if step["kept"]]
        assert len({step["rows"] for step in kept if step["rows"] > 1}) >= 2
        # one count whatever the rows; with batched drafting one for trees grown side by side (B > 1,
        # `GrownTrees`) and one for a lone row's tree (its own grower, then `pad_trees`); and one for a
        # forward over cache rows 0..R-1, one over the listed rows (fewer rows than their spread's bucket)
        counts: dict[tuple[bool, bool], set[int]] = {}
        buckets = runtime.static_target.row_sizes
        for step in kept:
            rows = step["cache_rows"]
            listed = bucket(len(rows), buckets) < bucket(max(rows) + 1, buckets)
            counts.setdefault((engine == "static_batched_drafting" and step["rows"] > 1, listed), set()).add(step["ops"])
        assert all(len(ops) == 1 for ops in counts.values()), str([(step["rows"], step["ops"]) for step in kept])
        assert {listed for _, listed in counts} == {False, True}  # both ways ran


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_rows_on_plain_steps_beside_rows_with_trees(engine):
    """A schedule that grows the large trees and gives the small-tree requests plain steps: every step
    verifies root-only trees beside grown ones in one forward; each request still decodes plain
    decoding's tokens, and the grown rows accept more than one token at a step."""
    from lmms_msd.speculative.decoding import plain_generate
    from lmms_msd.speculative.tree import EagleTree

    target, draft = pair("following")
    configs = greedy_configs()
    prompts = mixed_requests(target, configs)
    plain = [plain_generate(EagerRuntime(target), p, c) for p, c in zip(prompts, configs)]
    small = EagleTree(total_tokens=5, depth=3, top_k=2)
    runtime = EagerRuntime(target, draft) if engine == "eager" else BatchedStaticEngine(target, draft, max_batch=4, max_length=256)
    requests = [BatchRequest(p, c, tree=small if i % 2 else TREES["eagle2"]) for i, (p, c) in enumerate(zip(prompts, configs))]
    results = dict(generate_batched(runtime, requests, max_batch=4, schedule=lambda spec, batch: None if spec is small else spec))
    assert [results[i].token_ids for i in range(N_REQUESTS)] == [r.token_ids for r in plain]
    assert all(max(results[i].stats.accepted, default=0) == 0 for i in range(1, N_REQUESTS, 2))
    assert max(a for i in range(0, N_REQUESTS, 2) for a in results[i].stats.accepted) > 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
def test_to_device_copies_the_values(device):
    from lmms_msd.speculative.transfer import to_device

    values = [3, -1, 2**40, 0]
    copied = to_device(values, torch.device(device))
    assert copied.dtype == torch.long and copied.device.type == device and copied.tolist() == values
