"""dnis's training step against the MLP-only bound, where the step's time goes, and 1 vs 2 threads.

One process, the synthetic Criteo-shaped CTR data of `throughput_peers.py` (26 categorical Zipf
fields of `--vocab` ids each + 13 bucketised numeric fields = 39 fields, `--rows` rows, 80% train),
DeepFM's setting there: width 16, MLP 400-400-400, batch 4096, lr 1e-3, `train.optimizer`
sparse_adam (`--optimizer`).

- bound: the MLP alone, the part of DeepFM no embedding work can remove: the library's `MLP`
  block (39 * 16 = 624 -> 400 -> 400 -> 400 -> 1) on a fixed [4096, 624] input, BCE loss,
  backward and the trainer's (fused) Adam. A second reference also computes the gradient of the
  MLP's input, which DeepFM's backward must (its embeddings learn through it) and the bound skips.
- dnis DeepFM / FM: `Trainer.train_epoch`, the step loop of `Trainer.fit` (batch gathering from
  the shuffled split, `CTRTask.loss`, the loss check, zero_grad, backward, the trainer's
  optimizer), on a fresh consecutive slice of the training rows each time (so the rows vary as
  in an epoch), with the model, embedding and optimizer a user run builds.

Each side runs `--steps` steps per timing, after one warm-up timing; `--rounds` rounds alternate
the sides (the order rotated each round), so load from other jobs falls on all of them alike.
samples/s is the median over rounds, by wall clock and by this process's CPU time; the ratio to
the bound is the median of the per-round ratios.

The breakdown profiles `--profile-steps` DeepFM steps at `--profile-vocab` ids with
`torch.profiler`, `--profile-rounds` times (per part the median): forward hooks mark the
embedding, linear terms and MLP, backward ops are matched to the forward op that made them
(autograd sequence numbers), and the optimizers' own profiler ranges split the update. ms/step are
profiled times (the profiler adds some overhead; the unprofiled step time is printed next to them).

`--before TREE` (a dnis checkout or its src/, e.g. `git archive <commit> src | tar -x -C TREE`)
times that library beside this one: a worker process (this script, `--worker`, PYTHONPATH set to
TREE's src) builds the same data and runs DeepFM and FM steps when asked, in the same rounds as the
other sides (it times itself; this process waits meanwhile), and is profiled alternately with this
tree. `--auc` (on by default) trains DeepFM one epoch at `--profile-vocab` ids (`Trainer.fit`,
seed 0) with this tree, and with TREE first when given, and reports validation and test AUC.

`--threads` (on by default; `--no-threads` skips it) times MF (fields 0 and 1 as user and item),
FM, DeepFM and the bound at 1 and 2 intra-op threads (`torch.set_num_threads`), alternating, at
batch 4096 and at the trainer's default batch 256, on the `--thread-vocab` data.

The full run (3 data sets of 1M rows, about 40 s each to generate) takes about 10 minutes on a
shared 2-core machine; `--steps`, `--rounds` and `--thread-rounds` trade time for noise.

Results go to the "step-roofline" section of docs/performance.md (`--output`); `--quick` is a
small smoke run that writes nothing unless `--output` is given.

    .venv/bin/python benchmarks/step_roofline.py [--quick] [--vocab 10000 100000 1000000]
        [--before TREE --before-label NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, machine, write_section
from throughput_peers import BATCH, HIDDEN, LR, RANKS, WIDTH, Clock
from torch.nn import functional as F

Run = Callable[[int], int]  # run(steps) -> training rows processed

# ------------------------------------------------------------------------------------ the sides


def synthetic(rows: int, vocab: int):
    """throughput_peers.py's data: 26 Zipf fields (20 signal + 6 noise) + 13 numeric fields."""
    from dnis.data.synthetic import load_synthetic

    return load_synthetic(
        task="ctr", n_rows=rows, ranks=RANKS, noise_fields=6, numeric_fields=13, vocab=vocab, seed=0
    )


def bound_side(fields: int, batch: int, input_grad: bool = False) -> Run:
    """The MLP-only step: DeepFM's MLP on a fixed input, BCE, backward, the trainer's Adam.

    `input_grad`: backward also computes the gradient of the MLP's input, as it must in DeepFM
    (the embeddings learn through it): one more [batch, 400] x [400, fields * width] product."""
    from dnis.models.layers import MLP
    from dnis.train.trainer import adam

    torch.manual_seed(0)
    mlp = MLP(fields * WIDTH, HIDDEN, out_dim=1)
    optimizer = adam([{"params": list(mlp.parameters())}], LR)
    inputs = (torch.randn(batch, fields * WIDTH) * 0.01).requires_grad_(input_grad)
    labels = (torch.rand(batch) < 0.25).float()

    def run(steps: int) -> int:
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(mlp(inputs).squeeze(1), labels)
            optimizer.zero_grad(set_to_none=True)
            inputs.grad = None
            loss.backward()
            optimizer.step()
        return steps * batch

    return run


class DnisSide:
    """A user's training run of one model: `run(steps)` is `Trainer.train_epoch` over the next
    `steps` batches' worth of training rows."""

    def __init__(self, dataset, model: str, batch: int, optimizer: str) -> None:
        from dnis.embeddings import FieldLayout, FusedEmbedding
        from dnis.models import build
        from dnis.tasks import make_task
        from dnis.train import TrainConfig, Trainer

        self.dataset, self.batch, self.make_task = dataset, batch, make_task
        torch.manual_seed(0)
        options = {"hidden": HIDDEN} if model in ("deepfm", "widedeep") else {}
        embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), WIDTH)
        self.model = build(model, dataset.schema, embedding, **options)
        config = TrainConfig(epochs=1, batch_size=batch, lr=LR, optimizer=optimizer, seed=0)
        self.trainer = Trainer(self.model, make_task(dataset), config)
        self.epoch = 0

    def __call__(self, steps: int) -> int:
        from dnis.data.dataset import Split

        train = self.dataset.train
        rows = min(steps * self.batch, len(train))
        start = (self.epoch * rows) % (len(train) - rows + 1)
        part = Split(train.ids[start : start + rows], train.labels[start : start + rows])
        self.trainer.task = self.make_task(dataclasses.replace(self.dataset, train=part))
        self.epoch += 1
        self.trainer.train_epoch(self.epoch)
        return rows


def with_threads(run: Run, threads: int) -> Run:
    def threaded(steps: int) -> int:
        torch.set_num_threads(threads)
        try:
            return run(steps)
        finally:
            torch.set_num_threads(1)

    return threaded


def interleaved(sides: dict[str, Run | Callable[[int], tuple[int, float, float]]], steps, rounds):
    """One warm-up timing of each side, then `rounds` rounds timing each side once, the order
    rotated every round; {side: [(samples/s by wall, samples/s by CPU time), ...]}. A side that
    runs in another process (`BeforeWorker`) times itself: it returns (rows, wall s, CPU s)."""
    for name, run in sides.items():
        run(steps[name])
    names = list(sides)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            clock = Clock()
            done = sides[name](steps[name])
            wall, cpu = clock.stop()
            rows = done if isinstance(done, int) else done[0]
            if not isinstance(done, int):
                wall, cpu = done[1], done[2]
            rates[name].append((rows / wall, rows / cpu))
    return rates


# ------------------------------------------------------------------ the library before a change


class BeforeWorker:
    """dnis from another source tree (`--before`, e.g. the commit before a change) in a worker
    process: this script with `--worker`, `PYTHONPATH` set to that tree's `src`, building the
    same data and answering JSON commands on its stdin (run steps, profile, one epoch's AUC).
    The parent waits while the worker runs, so the two never share the cores."""

    def __init__(self, src: Path, rows: int, vocab: int, optimizer: str, models: list[str]):
        import json
        import subprocess
        import sys

        self.json = json
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rows", str(rows)]
        command += ["--vocab", str(vocab), "--optimizer", optimizer, "--models", *models]
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.library = self.ask({"op": "where"})["library"]
        if Path(self.library).resolve().is_relative_to(ROOT / "src"):
            raise SystemExit(
                f"--before {src}: the worker imported this tree's dnis ({self.library})"
            )

    def ask(self, command: dict[str, Any]) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(self.json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the --before worker stopped; see its error above")
        return self.json.loads(line)

    def side(self, model: str) -> Callable[[int], tuple[int, float, float]]:
        def run(steps: int) -> tuple[int, float, float]:
            done = self.ask({"op": "run", "model": model, "steps": steps})
            return done["rows"], done["wall"], done["cpu"]

        return run

    def close(self) -> None:
        self.ask({"op": "quit"})
        self.process.wait(timeout=60)


def worker(args) -> None:
    """The `--worker` loop: commands on stdin, one JSON answer per line on stdout."""
    import json
    import sys

    import dnis

    torch.set_num_threads(1)
    dataset = synthetic(args.rows, args.vocab[0])
    sides = {m: DnisSide(dataset, m, BATCH, args.optimizer) for m in args.models}
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            answer: Any = {}
        elif command["op"] == "where":
            answer = {"library": str(Path(dnis.__file__).parent)}
        elif command["op"] == "run":
            clock = Clock()
            rows = sides[command["model"]](command["steps"])
            wall, cpu = clock.stop()
            answer = {"rows": rows, "wall": wall, "cpu": cpu}
        elif command["op"] == "profile":
            answer = profile(sides["deepfm"], command["steps"])
        else:  # auc
            answer = one_epoch(dataset, args.optimizer)
        print(json.dumps(answer), flush=True)
        if command["op"] == "quit":
            return


def one_epoch(dataset, optimizer: str) -> dict[str, float]:
    """DeepFM trained one epoch (`Trainer.fit`, seed 0, the setting above): its validation and
    test AUC and log loss, and the epoch's training seconds."""
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.models import build
    from dnis.tasks import make_task
    from dnis.train import TrainConfig, Trainer

    torch.manual_seed(0)
    embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), WIDTH)
    model = build("deepfm", dataset.schema, embedding, hidden=HIDDEN)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=LR, optimizer=optimizer, seed=0)
    task = make_task(dataset)
    result = Trainer(model, task, config).fit()
    test = task.evaluate(model, "test", config.eval_batch_size)
    return {
        "valid_auc": result.valid["auc"],
        "valid_logloss": result.valid["logloss"],
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "seconds": result.train_seconds,
    }


def summary(runs: list[tuple[float, float]], **references: list[tuple[float, float]]):
    """Median samples/s (wall, CPU) and, against each reference timed in the same rounds, the
    median of the per-round ratios: `<name>` by wall clock, `<name>_cpu` by CPU time."""
    out: dict[str, Any] = {
        "wall": statistics.median(w for w, _ in runs),
        "cpu": statistics.median(c for _, c in runs),
        "runs": [w for w, _ in runs],
    }
    for name, reference in references.items():
        pairs = list(zip(runs, reference, strict=True))
        out[name] = statistics.median(a[0] / b[0] for a, b in pairs)
        out[f"{name}_cpu"] = statistics.median(a[1] / b[1] for a, b in pairs)
    return out


# ------------------------------------------------------------------------------------ profiling

LOOKUP, L2, LINEAR, FM, MLP_PART, LOSS = (
    "embedding",
    "embedding L2",
    "linear",
    "model",
    "mlp",
    "loss",
)
FORWARD_LABELS = {
    LOOKUP: "embedding lookup (offsets + gather): forward",
    L2: "embedding: squared norms of the looked-up rows (`last_l2`)",
    LINEAR: "linear terms (second lookup + sum): forward",
    FM: "FM interaction + sum of the terms: forward",
    MLP_PART: "MLP: forward",
    LOSS: "loss (BCE): forward",
}
BACKWARD_LABELS = {
    LOOKUP: "embedding: backward (sort of the rows + per-row gradient sums)",
    LINEAR: "linear terms: backward (the same, width 1)",
    FM: "FM interaction + sum of the terms: backward",
    MLP_PART: "MLP: backward",
    LOSS: "loss (BCE): backward",
}
# the sparse optimizer's ops by what they do: SparseAdam's and RowwiseAdam's in one row each
SPARSE_LABELS = {
    "distinct": "sparse optimizer: distinct rows (SparseAdam: coalesce; RowwiseAdam: order check)",
    "read": "sparse optimizer: read state rows (SparseAdam: sparse_mask; RowwiseAdam: index_select)",
    "write": "sparse optimizer: write state and table rows (SparseAdam: sparse add_; RowwiseAdam: "
    "index_copy_, index_add_)",
}
SPARSE_OPS = {  # SparseAdam's add_s are its sparse adds into state and table, but for a few dense
    # ones on the batch's rows (small next to them); RowwiseAdam's add_s are all row math
    "SparseAdam": {
        "aten::coalesce": "distinct",
        "aten::sparse_mask": "read",
        "aten::add_": "write",
    },
    "RowwiseAdam": {
        **dict.fromkeys(
            ("aten::coalesce", "aten::gt", "aten::all", "aten::is_nonzero"), "distinct"
        ),
        "aten::index_select": "read",
        "aten::index_copy_": "write",
        "aten::index_add_": "write",
    },
}
SPARSE_MATH = "sparse optimizer: row math (sub, pow, sqrt, div ...)"
ORDER = [
    "batch gathering (shuffle, index ids and labels)",
    FORWARD_LABELS[LOOKUP],
    FORWARD_LABELS[L2],
    FORWARD_LABELS[LINEAR],
    FORWARD_LABELS[FM],
    FORWARD_LABELS[MLP_PART],
    FORWARD_LABELS[LOSS],
    "loss check (isfinite) and loss bookkeeping",
    "zero_grad",
    BACKWARD_LABELS[LOSS],
    BACKWARD_LABELS[MLP_PART],
    BACKWARD_LABELS[FM],
    BACKWARD_LABELS[LOOKUP],
    BACKWARD_LABELS[LINEAR],
    "backward: other (AccumulateGrad, grad seed)",
    "dense optimizer step (fused Adam: MLP, biases)",
    *SPARSE_LABELS.values(),
    SPARSE_MATH,
    "other ops",
    "Python and time between ops",
]
GATHER_OPS = {"aten::randperm", "aten::slice", "aten::index"}
L2_OPS = {"aten::pow", "aten::sum", "aten::div", "aten::mul"}
BACKWARD = "autograd::engine::evaluate_function: "


def mark_parts(model: torch.nn.Module) -> list[Any]:
    """Profiler ranges "part:<name>" around the model's forward and its embedding, linear terms
    and MLP (forward hooks); returns the hook handles."""
    handles = []
    parts = {FM: model, LOOKUP: model.embedding}
    for name, attribute in ((LINEAR, "linear"), (MLP_PART, "mlp")):
        if getattr(model, attribute, None) is not None:
            parts[name] = getattr(model, attribute)
    for name, module in parts.items():
        stack: list[Any] = []

        def enter(_module, _inputs, name=name, stack=stack) -> None:
            stack.append(torch.profiler.record_function(f"part:{name}"))
            stack[-1].__enter__()

        def leave(_module, _inputs, _output, stack=stack) -> None:
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def part_of(event) -> str | None:
    while event is not None:
        if event.name.startswith("part:"):
            return event.name[len("part:") :]
        event = event.cpu_parent
    return None


def in_backward(event) -> bool:
    while event is not None:
        if event.name.startswith(BACKWARD):
            return True
        event = event.cpu_parent
    return False


def ms(event) -> float:
    return event.cpu_time_total / 1000


def classify(events, wall_ms: float, steps: int) -> dict[str, float]:
    """ms per step of each part (ORDER) from the profiler's events of `steps` training steps."""
    events = sorted(events, key=lambda e: e.time_range.start)
    # the part of the forward op that made each autograd node: the last forward op carrying a
    # sequence number is the one that made its node (the counter moves on after a node is made)
    made_by: dict[int, str] = {}
    for event in events:
        if event.sequence_nr < 0 or in_backward(event):
            continue
        part = part_of(event)
        if part is None and event.name == "aten::binary_cross_entropy_with_logits":
            part = LOSS
        if part is not None:
            made_by[event.sequence_nr] = part
    total: dict[str, float] = defaultdict(float)

    def add(label: str, value: float) -> None:
        total[label] += value

    top = [e for e in events if e.cpu_parent is None]
    for event in top:
        name = event.name
        if name.startswith("part:"):  # the whole forward: split by the parts inside
            rest = ms(event)
            for child in event.cpu_children:
                part = part_of(child)
                if child.name.startswith("part:") and part == LOOKUP:
                    for op in child.cpu_children:  # the lookup and the L2 of its rows
                        add(FORWARD_LABELS[L2 if op.name in L2_OPS else LOOKUP], ms(op))
                    add(FORWARD_LABELS[LOOKUP], ms(child) - sum(ms(o) for o in child.cpu_children))
                    rest -= ms(child)
                elif child.name.startswith("part:"):
                    add(FORWARD_LABELS[part], ms(child))
                    rest -= ms(child)
            add(FORWARD_LABELS[FM], rest)
        elif name.startswith(BACKWARD):
            part = made_by.get(event.sequence_nr)
            add(BACKWARD_LABELS.get(part, "backward: other (AccumulateGrad, grad seed)"), ms(event))
        elif name == "aten::ones_like":  # the seed of loss.backward()
            add("backward: other (AccumulateGrad, grad seed)", ms(event))
        elif name in GATHER_OPS:
            add(ORDER[0], ms(event))
        elif name == "aten::binary_cross_entropy_with_logits":
            add(FORWARD_LABELS[LOSS], ms(event))
        elif name in ("aten::isfinite", "aten::is_nonzero", "aten::mul", "aten::add_", "aten::to"):
            add("loss check (isfinite) and loss bookkeeping", ms(event))
        elif name.startswith("Optimizer.zero_grad"):
            add("zero_grad", ms(event))
        elif name.startswith(tuple(f"Optimizer.step#{kind}." for kind in SPARSE_OPS)):
            ops, rest = SPARSE_OPS[name.split("#")[1].split(".")[0]], ms(event)
            for child in event.cpu_children:
                if child.name in ops:
                    add(SPARSE_LABELS[ops[child.name]], ms(child))
                    rest -= ms(child)
            add(SPARSE_MATH, rest)
        elif name.startswith("Optimizer.step#"):
            add("dense optimizer step (fused Adam: MLP, biases)", ms(event))
        else:
            add("other ops", ms(event))
    add("Python and time between ops", wall_ms - sum(ms(e) for e in top))
    return {label: total[label] / steps for label in ORDER if label in total}


def median_profile(found: list[dict[str, Any]]) -> dict[str, Any]:
    """Per part, the median ms/step over several profiles of the same side (0 where absent)."""
    labels = [label for label in ORDER if any(label in f["parts"] for f in found)]
    return {
        "parts": {k: statistics.median(f["parts"].get(k, 0.0) for f in found) for k in labels},
        "plain_ms": statistics.median(f["plain_ms"] for f in found),
        "steps": found[0]["steps"],
        "rounds": len(found),
    }


def profile(side: DnisSide, steps: int) -> dict[str, Any]:
    """Profiled breakdown of `steps` steps of `side` (hooks removed after), and the step time of
    the same number of unprofiled steps just before."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    clock = Clock()
    rows = side(steps)
    plain_ms = 1000 * clock.stop()[0] / (rows / side.batch)
    handles = mark_parts(side.model)
    try:
        side(1)  # the hooks' first pass
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            clock = Clock()
            rows = side(steps)
            wall_ms = 1000 * clock.stop()[0]
    finally:
        for handle in handles:
            handle.remove()
    done = rows // side.batch
    return {"parts": classify(prof.events(), wall_ms, done), "plain_ms": plain_ms, "steps": done}


# ------------------------------------------------------------------------------------ the report

BOUND, BOUND_GRAD = "MLP-only bound", "MLP-only + input gradient"


def roofline_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| ids per field (table rows) | side | samples/s | CPU samples/s | / bound (wall) | "
        "/ bound (CPU) | / bound with input gradient (wall) | rounds (samples/s) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for config in results:
        where = f"{config['vocab']:,} ({config['table_rows']:,})"
        for side, r in config["sides"].items():
            ratios = [f"{r[k]:.2f}x" if k in r else "" for k in ("bound", "bound_cpu", "grad")]
            rounds = ", ".join(f"{x:,.0f}" for x in r["runs"])
            lines.append(
                f"| {where} | {side} | {r['wall']:,.0f} | {r['cpu']:,.0f} | "
                f"{' | '.join(ratios)} | {rounds} |"
            )
    return lines


MLP_LABELS = (
    FORWARD_LABELS[MLP_PART],
    BACKWARD_LABELS[MLP_PART],
    "dense optimizer step (fused Adam: MLP, biases)",
)


def breakdown_lines(found: dict[str, Any], before: dict[str, Any] | None = None) -> list[str]:
    """The profiled parts of a step; with `before`, the earlier library's beside them."""
    parts, step = found["parts"], sum(found["parts"].values())
    if before is None:
        lines = ["| part | ms/step | share |", "|---|---:|---:|"]
        lines += [f"| {label} | {v:.2f} | {100 * v / step:.1f}% |" for label, v in parts.items()]
        lines.append(f"| **profiled step** | **{step:.2f}** | 100% |")
    else:
        old, old_step = before["parts"], sum(before["parts"].values())
        lines = [
            "| part | before: ms/step | after: ms/step | after - before | after: share |",
            "|---|---:|---:|---:|---:|",
        ]
        for label in [label for label in ORDER if label in parts or label in old]:
            a, b = old.get(label), parts.get(label)
            cells = [f"{a:.2f}" if a is not None else "-", f"{b:.2f}" if b is not None else "-"]
            cells.append(f"{(b or 0.0) - (a or 0.0):+.2f}")
            cells.append(f"{100 * (b or 0.0) / step:.1f}%")
            lines.append(f"| {label} | {' | '.join(cells)} |")
        lines.append(
            f"| **profiled step** | **{old_step:.2f}** | **{step:.2f}** | "
            f"**{step - old_step:+.2f}** | 100% |"
        )
    mlp = sum(parts.get(label, 0.0) for label in MLP_LABELS)
    text = (
        f"Unprofiled, {found['steps']} steps of the same run took {found['plain_ms']:.1f} ms a "
        "step just before each profile (median; the profiler's overhead and changes in load "
        "make the difference). "
        "The MLP's forward, "
        f"backward and Adam take {mlp:.1f} ms ({100 * mlp / step:.0f}%) of the profiled step, "
        f"the rest {step - mlp:.1f} ms ({100 * (step - mlp) / step:.0f}%)"
    )
    if before is not None:
        old_mlp = sum(before["parts"].get(label, 0.0) for label in MLP_LABELS)
        text += (
            f" (before: {old_mlp:.1f} ms and {old_step - old_mlp:.1f} ms of {old_step:.1f} ms; "
            f"{before['plain_ms']:.1f} ms a step unprofiled)"
        )
    text += (
        f". In the timed rounds of the same run the MLP-only bound's step took "
        f"{found['bound_ms']:.1f} ms, {found['grad_ms']:.1f} ms with the input gradient, dnis's "
        f"DeepFM step {found['dnis_ms']:.1f} ms"
    )
    if "before_ms" in found:
        text += f" ({found['before_ms']:.1f} ms before)"
    return [*lines, "", text + "."]


def before_lines(results: list[dict[str, Any]], models: list[str], label: str) -> list[str]:
    lines = [
        "| ids per field | model | before: / bound | after: / bound | after / before (wall) | "
        "after / before (CPU) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for config in results:
        for model in models:
            after, old = (
                config["sides"][f"dnis {model}"],
                config["sides"][f"dnis {model} ({label})"],
            )
            lines.append(
                f"| {config['vocab']:,} | {model} | {old['bound']:.2f}x | {after['bound']:.2f}x | "
                f"{after['before']:.2f}x | {after['before_cpu']:.2f}x |"
            )
    return lines


def auc_lines(aucs: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| library | valid AUC | test AUC | valid logloss | test logloss | epoch seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in aucs.items():
        lines.append(
            f"| {name} | {r['valid_auc']:.5f} | {r['test_auc']:.5f} | {r['valid_logloss']:.5f} | "
            f"{r['test_logloss']:.5f} | {r['seconds']:.0f} |"
        )
    if len(aucs) == 2:
        (_, a), (_, b) = aucs.items()
        lines += [
            "",
            f"AUC after - before: valid {b['valid_auc'] - a['valid_auc']:+.6f}, test "
            f"{b['test_auc'] - a['test_auc']:+.6f}.",
        ]
    return lines


def thread_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | batch | 1 thread samples/s | 2 threads samples/s | 2 / 1 (wall) | "
        "CPU s per sample, 2 / 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['one']['wall']:,.0f} | {r['two']['wall']:,.0f} "
            f"| {r['two']['one']:.2f}x | {r['one']['cpu'] / r['two']['cpu']:.2f}x |"
        )
    return lines


def thread_verdict(rows: list[dict[str, Any]], load: tuple[float, float]) -> str:
    pays = [f"{r['model']} at batch {r['batch']}" for r in rows if r["two"]["one"] >= 1.1]
    low, high = min(r["two"]["one"] for r in rows), max(r["two"]["one"] for r in rows)
    text = (
        f"The 1-minute load average was {load[0]:.1f} before and {load[1]:.1f} after this "
        f"measurement on {os.cpu_count()} CPUs: other jobs held the cores, so a second thread "
        "had no free core to run on and its OpenMP barriers wait for a descheduled thread. The "
        "ratios say what 2 threads do on a shared machine, not on an idle one. "
    )
    if not pays:
        return text + (
            f"Here 2 threads gave {low:.2f}x to {high:.2f}x of 1 thread's samples/s for every "
            "model and batch size: the data supports 1 intra-op thread as the default on a "
            "shared machine; whether 2 pay on an idle one this run cannot say (no library "
            "default was changed)."
        )
    return text + (
        f"2 threads gained at least 1.1x for {', '.join(pays)} (all rows: {low:.2f}x to "
        f"{high:.2f}x); a default of 2 for those is supported only as far as this shared "
        "machine's load is typical (no library default was changed)."
    )


# ------------------------------------------------------------------------------------ main


def load_now() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (writes nothing)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows generated (80%% train)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--models", nargs="+", default=["deepfm", "fm"])
    parser.add_argument("--optimizer", default="sparse_adam", help="train.optimizer of dnis")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds over the sides")
    parser.add_argument("--profile-vocab", type=int, default=100_000)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument(
        "--profile-rounds", type=int, default=3, help="profiles (alternating with --before's)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="another dnis source tree (a checkout, or its src/) to time beside this one, in a "
        "worker process: e.g. `git archive <commit> src | tar -x -C /tmp/before`",
    )
    parser.add_argument("--before-label", default="before", help="how the report names --before")
    parser.add_argument("--before-note", default="", help="a sentence on --before for the report")
    parser.add_argument(
        "--auc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train DeepFM one epoch at --profile-vocab (and under --before) and report its AUC",
    )
    parser.add_argument("--threads", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--thread-vocab", type=int, default=100_000)
    parser.add_argument("--thread-batches", type=int, nargs="+", default=[BATCH, 256])
    parser.add_argument("--thread-rows", type=int, default=4 * BATCH, help="rows per timing")
    parser.add_argument("--thread-rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="default docs/performance.md (not --quick)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.rows, args.vocab, args.steps, args.rounds = 20_000, [2_000, 10_000], 2, 2
        args.profile_vocab, args.profile_steps, args.thread_vocab = 10_000, 2, 10_000
        args.profile_rounds = 1
        args.thread_rows, args.thread_rounds = 2 * BATCH, 1
    output = args.output or (None if args.quick else ROOT / "docs" / "performance.md")
    before_src = None
    if args.before is not None:
        before_src = args.before / "src" if (args.before / "src" / "dnis").is_dir() else args.before
        if not (before_src / "dnis").is_dir():
            parser.error(f"--before {args.before}: no dnis package there (nor under src/)")
    label = args.before_label
    torch.set_num_threads(1)
    loads = [load_now()]

    results: list[dict[str, Any]] = []
    breakdown: dict[str, Any] | None = None
    old_breakdown: dict[str, Any] | None = None
    aucs: dict[str, dict[str, float]] = {}
    threads: list[dict[str, Any]] = []
    thread_load = (0.0, 0.0)
    profile_vocab = args.profile_vocab if args.profile_vocab in args.vocab else max(args.vocab)
    thread_vocab = args.thread_vocab if args.thread_vocab in args.vocab else max(args.vocab)
    for vocab in args.vocab:
        clock = Clock()
        old = None
        if before_src is not None:  # it builds its data while this process builds its own
            old = BeforeWorker(before_src, args.rows, vocab, args.optimizer, args.models)
        dataset = synthetic(args.rows, vocab)
        fields = len(dataset.schema.features)
        print(
            f"data: {vocab:,} ids per field, {sum(dataset.cardinalities):,} table rows, "
            f"{len(dataset.train):,} training rows, {fields} fields ({clock.stop()[0]:.0f} s)",
            flush=True,
        )
        sides: dict[str, Any] = {
            BOUND: bound_side(fields, BATCH),
            BOUND_GRAD: bound_side(fields, BATCH, input_grad=True),
        }
        models = {f"dnis {m}": DnisSide(dataset, m, BATCH, args.optimizer) for m in args.models}
        sides.update(models)
        if old is not None:
            sides.update({f"dnis {m} ({label})": old.side(m) for m in args.models})
        rates = interleaved(sides, dict.fromkeys(sides, args.steps), args.rounds)
        config = {
            "vocab": vocab,
            "table_rows": sum(dataset.cardinalities),
            "fields": fields,
            "sides": {BOUND: summary(rates[BOUND])},
        }
        for name in list(sides)[1:]:
            references = {"bound": rates[BOUND]}
            if name != BOUND_GRAD:
                references["grad"] = rates[BOUND_GRAD]
            if old is not None and name in models:
                references["before"] = rates[f"{name} ({label})"]
            config["sides"][name] = summary(rates[name], **references)
        results.append(config)
        for name, r in config["sides"].items():
            ratio = f", {r['bound']:.2f}x the bound" if "bound" in r else ""
            ratio += f", {r['before']:.2f}x {label}" if "before" in r else ""
            print(f"  {name:30s} {r['wall']:9,.0f} samples/s ({r['cpu']:,.0f} by CPU){ratio}")
        loads.append(load_now())
        if vocab == profile_vocab and "dnis deepfm" in models:
            found, found_old = [], []
            for _ in range(args.profile_rounds):  # alternating, so load changes hit both
                found.append(profile(models["dnis deepfm"], args.profile_steps))
                if old is not None:
                    found_old.append(old.ask({"op": "profile", "steps": args.profile_steps}))
            breakdown = median_profile(found)
            old_breakdown = median_profile(found_old) if found_old else None
            breakdown["vocab"] = vocab
            for key, name in (
                ("bound_ms", BOUND),
                ("grad_ms", BOUND_GRAD),
                ("dnis_ms", "dnis deepfm"),
                ("before_ms", f"dnis deepfm ({label})"),
            ):
                if name in config["sides"]:
                    breakdown[key] = 1000 * BATCH / config["sides"][name]["wall"]
            print("\n".join(breakdown_lines(breakdown, old_breakdown)), flush=True)
        del models, sides
        if args.auc and vocab == profile_vocab:
            if old is not None:
                aucs[label] = old.ask({"op": "auc"})
            aucs["this tree"] = one_epoch(dataset, args.optimizer)
            print("\n".join(auc_lines(aucs)), flush=True)
            loads.append(load_now())
        if old is not None:
            old.close()
        if args.threads and vocab == thread_vocab:
            before = load_now()
            threads = measure_threads(dataset, args)
            thread_load = (before, load_now())
            print("\n".join(thread_lines(threads)), flush=True)
            loads.append(thread_load[1])
        del dataset

    extra = {
        "breakdown_before": old_breakdown,
        "aucs": aucs,
        "label": label,
        "min_load": min(loads),
    }
    text = report(args, results, breakdown, threads, max(loads), thread_load, extra)
    print()
    print(text)
    if output is not None and not args.no_write:
        write_section(output, "step-roofline", text)
        print(f"written to the 'step-roofline' section of {output}")


def measure_threads(dataset, args) -> list[dict[str, Any]]:
    """1 vs 2 intra-op threads for each model and batch size, alternating in every round."""
    sides: dict[str, Run] = {}
    steps: dict[str, int] = {}
    keys = []
    for batch in args.thread_batches:
        n = max(1, args.thread_rows // batch)  # the same training rows per timing at any batch
        for model in ("mf", "fm", "deepfm", "bound"):
            if model == "bound":
                run: Run = bound_side(len(dataset.schema.features), batch)
            else:
                run = DnisSide(dataset, model, batch, args.optimizer)
            keys.append((model, batch))
            for t in (1, 2):
                sides[f"{model}/{batch}/{t}"] = with_threads(run, t)
                steps[f"{model}/{batch}/{t}"] = n
    rates = interleaved(sides, steps, args.thread_rounds)
    rows = []
    for model, batch in keys:
        one, two = rates[f"{model}/{batch}/1"], rates[f"{model}/{batch}/2"]
        name = BOUND if model == "bound" else f"dnis {model}"
        rows.append(
            {"model": name, "batch": batch, "one": summary(one), "two": summary(two, one=one)}
        )
    return rows


def report(args, results, breakdown, threads, load: float, thread_load, extra) -> str:
    fields = results[0]["fields"]
    label, old = extra["label"], extra["breakdown_before"]
    lines = [
        "# Step roofline: the whole training step against the MLP alone",
        "",
        f"One process{' (and a worker process for the earlier library below)' if args.before else ''}"
        ", 1 torch thread, the synthetic Criteo-shaped CTR data of "
        f"`throughput_peers.py` ({args.rows:,} rows, 80% train; 26 categorical Zipf fields of the "
        f"given ids each + 13 bucketised numeric fields = {fields} fields). The bound is the MLP "
        f"alone (the library's `MLP`, {fields * WIDTH} -> {' -> '.join(map(str, HIDDEN))} -> 1, "
        f"batch {BATCH}, a fixed input, BCE, backward, the trainer's fused Adam): DeepFM's step "
        "with free embeddings. DeepFM's backward must also compute the gradient of the MLP's "
        "input (the embeddings learn through it), one more [4096, 400] x [400, 624] product that "
        "the bound skips; the second reference includes it. dnis is `Trainer.train_epoch` (the "
        "step loop of `Trainer.fit`: batch gathering, `CTRTask.loss`, the loss check, backward, "
        f"`train.optimizer` {args.optimizer}) with width {WIDTH}, MLP "
        f"{'-'.join(map(str, HIDDEN))}, batch {BATCH}, lr {LR}, each timing on the next slice of "
        f"the training rows. A timing is {args.steps} steps (after one warm-up timing of each "
        f"side); {args.rounds} rounds alternate the sides, the order rotated each round, so load "
        "changes hit all of them; samples/s is the median over rounds (by wall clock and by "
        "this process's CPU time), a ratio the median of the per-round ratios. "
        "`benchmarks/step_roofline.py`"
        + (" (--quick: a smoke run, too short to read)." if args.quick else "."),
        "",
        f"Machine: {machine()}; shared with other jobs (a benchmark grid and the test suite): "
        f"1-minute load average {extra['min_load']:.1f} to {load:.1f} on {os.cpu_count()} CPUs "
        "during the run, so "
        "wall-clock rates are stretched; the ratios, measured side by side, are what to read.",
        "",
        "## Whole step vs the MLP-only bound",
        "",
        *roofline_table(results),
        "",
        "FM has no MLP; its ratio says how its whole step compares with DeepFM's MLP alone.",
    ]
    if args.before is not None:
        lines += [
            "",
            f"## Before and after: this tree vs {label}",
            "",
            f'The rows "({label})" above are the library of another source tree '
            f"(`--before`{': ' + args.before_note if args.before_note else ''}), run by this "
            "script in a worker process that builds the same "
            "data and times its own steps (wall and CPU) when this process asks; this process "
            "waits meanwhile, so the two never share the cores, and the worker's timings take "
            "their turn in the same rounds as the others. Per model, the ratio of each side to "
            "the bound, and this tree's samples/s over the earlier tree's (median of the "
            "per-round ratios):",
            "",
            *before_lines(results, args.models, label),
        ]
    if breakdown is not None:
        lines += [
            "",
            f"## Where a DeepFM step goes ({breakdown['vocab']:,} ids per field, profiler)",
            "",
            f"`torch.profiler` over {breakdown['steps']} steps of `Trainer.train_epoch` (1 "
            f"thread) in each of {breakdown['rounds']} profile(s); per part the median ms/step "
            "(the profiled step is their sum). Forward hooks mark the embedding, the linear terms and the MLP; backward ops "
            "are charged to the part whose forward op made them (autograd sequence numbers); the "
            "sparse optimizer's time is split by its ops."
            + (
                f' The "before" column is {label}, profiled the same way in its worker '
                "process, each of its profiles right after one of this tree's."
                if old is not None
                else ""
            ),
            "",
            *breakdown_lines(breakdown, old),
        ]
    if extra["aucs"]:
        lines += [
            "",
            f"## AUC after one epoch ({args.profile_vocab:,} ids per field)",
            "",
            "DeepFM as above trained one epoch with `Trainer.fit` (seed 0, the same data, "
            f"`train.optimizer` {args.optimizer}), then evaluated on the validation and test "
            "splits"
            + (f", by {label} (its worker) and by this tree, one after the other." if old else "."),
            "",
            *auc_lines(extra["aucs"]),
        ]
    if threads:
        lines += [
            "",
            "## 1 vs 2 intra-op threads",
            "",
            f"`torch.set_num_threads` 1 and 2 alternating in every round ({args.thread_rounds} "
            f"rounds after a warm-up, {args.thread_rows:,} training rows per timing), "
            f"{args.thread_vocab:,} ids per field, at batch {BATCH} and at the trainer's default "
            "batch 256, the same trainer path as above. MF uses fields 0 and 1 as user and item. "
            "The last column is the CPU time a sample costs with 2 threads over 1 thread.",
            "",
            *thread_lines(threads),
            "",
            thread_verdict(threads, thread_load),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
