"""Training throughput of DeepFM: dnis vs DeepCTR-Torch vs FuxiCTR vs a hand-written PyTorch loop.

Data: the synthetic CTR generator, Criteo-shaped: 26 categorical fields with Zipf ids (20 signal
+ 6 noise, `--vocab` ids each) and 13 numeric fields, which our encoder bucketises into ids (11
per field); `--rows` rows (1M by default) split 80/10/10. It is generated once, in memory, and
every side receives the very same encoded tensors: 39 categorical fields, the 80% training rows,
and the held-out 10% test rows for the AUC. `--vocab` takes several sizes (default 10,000,
100,000 and 1,000,000 ids per field): one data set and one table each; the larger tables are the
regime sparse gradients are for (a dense optimizer touches every row of every table at every
step), while with small tables the MLP, the same in every framework, takes most of the time.

Every side trains DeepFM with width 16, MLP 400-400-400 (ReLU, no dropout, no batch norm), linear
terms + FM + MLP, no regularisation, learning rate 1e-3, batch 4096, shuffled, on 1 torch thread
in one process (data loaders without worker processes), each in a fresh subprocess run one after
the other. After `--warmup` training batches (allocator, optimizer state, kernels), one epoch is
timed; samples/s = training rows / seconds of that epoch, then the test AUC (scikit-learn) shows
that no side buys speed by learning less.

- dnis sparse_adam / dnis adam: `Trainer.fit` (1 epoch; its validation is a 4096-row slice) with
  `train.optimizer` sparse_adam (SparseAdam on the id tables, Adam on the rest) or adam.
- hand-written: one `nn.Embedding(sparse=True)` over all fields with per-field offsets, a width-1
  one for the linear terms, FM and MLP; randperm batches; SparseAdam + Adam (benchmarks/throughput.py's
  `HandDeepFM`): the reference dnis must reach 0.9x of.
- DeepCTR-Torch: `DeepFM(...).compile("adam", "binary_crossentropy").fit(x, y, batch_size=4096)`
  (its own TensorDataset/DataLoader; l2_reg_* set to 0, init as its defaults).
- FuxiCTR: its `DeepFM` as published in its model zoo (`FeatureEmbedding`, `FactorizationMachine`,
  `MLP_Block` over a `FeatureMap` of 39 categorical features; the model zoo is not in the pip
  package, so the ~15 lines are restated here), `BaseModel.fit` over its `NpzDataLoader`
  (num_workers=0; the data is written to a temporary .npz, its input format); its gradient-norm
  clipping (10) is part of its training step. Its validation is a 4096-row slice.

A peer that is not installed (`pip install -e '.[bench]'`) or fails is skipped with the reason.
Results go to the "Training throughput" section of docs/performance.md (`--no-write`: print only).

    .venv/bin/python benchmarks/throughput_peers.py [--rows 1000000] [--sides dnis-sparse hand ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

WIDTH = 16
BATCH = 4096
HIDDEN = (400, 400, 400)
LR = 1e-3
VALID_ROWS = 4096  # the per-epoch validation of the sides whose fit() needs one: kept negligible
SIDES = ("dnis-sparse", "dnis-adam", "hand", "deepctr", "fuxictr")
LABELS = {
    "dnis-sparse": "dnis (sparse_adam)",
    "dnis-adam": "dnis (adam)",
    "hand": "hand-written loop (SparseAdam)",
    "deepctr": "DeepCTR-Torch",
    "fuxictr": "FuxiCTR",
}
RANKS = (8, 8, 8, 6, 6, 6, 4, 4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1)  # 20 signal fields


class Skip(Exception):
    """A peer that cannot run here; the message says why."""


# ------------------------------------------------------------------------------------ the sides


class Clock:
    """Wall-clock and CPU seconds of this process since creation. On a shared machine other jobs
    take turns on the cores, which stretches wall time but not the CPU time of a 1-thread run."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def load_data(path: str) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=False)


def auc_of(scores, labels) -> float:
    """dnis's rank-sum AUC (the same for every side; no scikit-learn needed)."""
    import torch

    from dnis.tasks.metrics import auc

    return auc(torch.as_tensor(scores).reshape(-1), torch.as_tensor(labels).reshape(-1).float())


def run_dnis(data: dict[str, Any], optimizer: str, warmup: int) -> dict[str, Any]:
    import dataclasses

    import torch

    import dnis
    from dnis.data.dataset import Split
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.models import build
    from dnis.tasks import make_task
    from dnis.tasks.base import predict
    from dnis.train import TrainConfig, Trainer

    ds = data["dataset"]
    ds = dataclasses.replace(
        ds, valid=Split(ds.valid.ids[:VALID_ROWS], ds.valid.labels[:VALID_ROWS])
    )
    torch.manual_seed(0)
    model = build(
        "deepfm", ds.schema, FusedEmbedding(FieldLayout.from_dataset(ds), WIDTH), hidden=HIDDEN
    )
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=LR, optimizer=optimizer, patience=0)
    n = warmup * BATCH
    warm = dataclasses.replace(ds, train=Split(ds.train.ids[:n], ds.train.labels[:n]))
    Trainer(model, make_task(warm), config).fit()
    trainer = Trainer(model, make_task(ds), config)
    clock = Clock()
    trainer.fit()
    seconds, cpu_seconds = clock.stop()
    scores = predict(model, ds.test.ids)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "auc": auc_of(scores.numpy(), ds.test.labels.numpy()),
        "version": f"dnis {dnis.__version__}" if hasattr(dnis, "__version__") else "dnis",
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_hand(data: dict[str, Any], warmup: int) -> dict[str, Any]:
    import torch
    from throughput import HandDeepFM
    from torch.nn import functional as F

    ds = data["dataset"]
    ids, labels = ds.train.ids, ds.train.labels
    torch.manual_seed(0)
    model = HandDeepFM(ds.cardinalities, WIDTH, HIDDEN, sparse=True)
    tables = [model.embedding.weight, model.linear.weight]
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    optimizers = [torch.optim.SparseAdam(tables, lr=LR), torch.optim.Adam(dense, lr=LR)]
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step(batch_ids, batch_labels) -> None:
        loss = F.binary_cross_entropy_with_logits(model(batch_ids), batch_labels)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    for start in range(0, warmup * BATCH, BATCH):
        step(ids[start : start + BATCH], labels[start : start + BATCH])
    clock = Clock()
    order = torch.randperm(len(ids), generator=generator)
    for start in range(0, len(ids), BATCH):
        index = order[start : start + BATCH]
        step(ids[index], labels[index])
    seconds, cpu_seconds = clock.stop()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(ds.test.ids[s : s + 8192]) for s in range(0, len(ds.test), 8192)])
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "auc": auc_of(scores.numpy(), ds.test.labels.numpy()),
        "version": f"torch {torch.__version__}",
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_deepctr(data: dict[str, Any], warmup: int) -> dict[str, Any]:
    import importlib.metadata

    import torch

    try:
        from deepctr_torch.inputs import SparseFeat
        from deepctr_torch.models import DeepFM
    except ImportError as error:
        raise Skip(f"deepctr-torch is not installed ({error}); pip install -e '.[bench]'") from None

    ds = data["dataset"]
    names = [f"f{i}" for i in range(len(ds.cardinalities))]
    columns = [
        SparseFeat(name, vocabulary_size=card, embedding_dim=WIDTH)
        for name, card in zip(names, ds.cardinalities, strict=True)
    ]
    model = DeepFM(
        columns,
        columns,
        dnn_hidden_units=HIDDEN,
        l2_reg_linear=0.0,
        l2_reg_embedding=0.0,
        l2_reg_dnn=0.0,
        dnn_dropout=0.0,
        seed=0,
        task="binary",
        device="cpu",
    )
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")

    def inputs(ids: torch.Tensor) -> dict[str, Any]:
        array = ids.numpy()
        return {name: array[:, i] for i, name in enumerate(names)}

    train_x, train_y = inputs(ds.train.ids), ds.train.labels.numpy()
    n = warmup * BATCH
    model.fit(inputs(ds.train.ids[:n]), train_y[:n], batch_size=BATCH, epochs=1, verbose=0)
    clock = Clock()
    model.fit(train_x, train_y, batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
    seconds, cpu_seconds = clock.stop()
    scores = model.predict(inputs(ds.test.ids), batch_size=8192).reshape(-1)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "auc": auc_of(scores, ds.test.labels.numpy()),
        "version": f"deepctr-torch {importlib.metadata.version('deepctr-torch')}",
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_fuxictr(data: dict[str, Any], warmup: int) -> dict[str, Any]:
    import importlib.metadata
    import logging

    import numpy as np
    import torch
    from torch import nn

    try:
        from fuxictr.features import FeatureMap
        from fuxictr.pytorch.dataloaders.npz_dataloader import NpzDataLoader
        from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
        from fuxictr.pytorch.models import BaseModel
    except ImportError as error:
        raise Skip(f"fuxictr is not installed ({error}); pip install -e '.[bench]'") from None
    logging.disable(logging.INFO)

    class DeepFM(BaseModel):
        """FuxiCTR's model-zoo DeepFM (model_zoo/DeepFM/DeepFM_torch/src/DeepFM.py), restated."""

        def __init__(self, feature_map, embedding_dim, hidden_units, **kwargs) -> None:
            super().__init__(feature_map, model_id="DeepFM", gpu=-1, **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=hidden_units,
                hidden_activations="ReLU",
                output_activation=None,
                dropout_rates=0,
                batch_norm=False,
            )
            self.compile(kwargs["optimizer"], kwargs["loss"], kwargs["learning_rate"])
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(X)
            y_pred = self.fm(X, feature_emb)
            y_pred += self.mlp(feature_emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y_pred)}

    ds = data["dataset"]
    names = [f"f{i}" for i in range(len(ds.cardinalities))]
    with tempfile.TemporaryDirectory(prefix="fuxictr-bench-") as tmp:
        feature_map = FeatureMap("throughput", tmp)
        feature_map.labels = ["label"]
        feature_map.default_emb_dim = WIDTH
        for name, card in zip(names, ds.cardinalities, strict=True):
            feature_map.features[name] = {"source": "", "type": "categorical", "vocab_size": card}
        feature_map.num_fields = feature_map.get_num_fields()
        feature_map.total_features = sum(ds.cardinalities)
        feature_map.set_column_index()

        def npz(split, rows: int | None, path: str) -> str:
            ids, labels = split.ids[:rows].numpy(), split.labels[:rows].numpy()
            columns = {name: ids[:, i] for i, name in enumerate(names)}
            np.savez(path, label=labels, **columns)
            return path

        def loader(path: str, shuffle: bool) -> NpzDataLoader:
            return NpzDataLoader(
                feature_map, path, batch_size=BATCH, shuffle=shuffle, num_workers=0
            )

        train = loader(npz(ds.train, None, f"{tmp}/train.npz"), True)
        valid = loader(npz(ds.valid, VALID_ROWS, f"{tmp}/valid.npz"), False)
        test = loader(npz(ds.test, None, f"{tmp}/test.npz"), False)
        warm = loader(npz(ds.train, warmup * BATCH, f"{tmp}/warm.npz"), False)
        os.makedirs(f"{tmp}/models/throughput", exist_ok=True)
        torch.manual_seed(0)
        model = DeepFM(
            feature_map,
            WIDTH,
            list(HIDDEN),
            learning_rate=LR,
            optimizer="adam",
            loss="binary_crossentropy",
            embedding_regularizer=None,
            net_regularizer=None,
            verbose=0,
            model_root=f"{tmp}/models",
            metrics=["AUC"],
        )
        model.fit(warm, epochs=1, validation_data=valid)
        model._eval_steps = None  # fit() kept the warm-up's steps per epoch; let it recount
        clock = Clock()
        model.fit(train, epochs=1, validation_data=valid)
        seconds, cpu_seconds = clock.stop()
        scores = model.predict(test)
        assert isinstance(model.embedding_layer, nn.Module)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "auc": auc_of(scores, ds.test.labels.numpy()),
        "version": f"fuxictr {importlib.metadata.version('fuxictr')}",
        "params": sum(p.numel() for p in model.parameters()),
    }


def child(side: str, data_path: str, warmup: int) -> None:
    import torch

    torch.set_num_threads(1)
    data = load_data(data_path)
    try:
        if side == "dnis-sparse":
            result = run_dnis(data, "sparse_adam", warmup)
        elif side == "dnis-adam":
            result = run_dnis(data, "adam", warmup)
        elif side == "hand":
            result = run_hand(data, warmup)
        elif side == "deepctr":
            result = run_deepctr(data, warmup)
        else:
            result = run_fuxictr(data, warmup)
    except Skip as why:
        result = {"skipped": str(why)}
    if "seconds" in result:
        rows = len(data["dataset"].train)
        result["samples_per_s"] = rows / result["seconds"]
        result["cpu_samples_per_s"] = rows / result["cpu_seconds"]
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ the parent


def make_data(rows: int, vocab: int, path: Path) -> dict[str, Any]:
    import torch

    from dnis.data.synthetic import load_synthetic

    started = time.perf_counter()
    ds = load_synthetic(
        task="ctr",
        n_rows=rows,
        ranks=RANKS,
        noise_fields=6,
        numeric_fields=13,
        vocab=vocab,
        seed=0,
    )
    info = {
        "train": len(ds.train),
        "test": len(ds.test),
        "fields": len(ds.schema.features),
        "ids": sum(ds.cardinalities),
        "seconds": time.perf_counter() - started,
    }
    torch.save({"dataset": ds}, path)
    return info


def run_side(side: str, data_path: Path, warmup: int, timeout: float) -> dict[str, Any]:
    from _common import run_child

    args = ["--child", side, "--data", str(data_path), "--warmup", str(warmup)]
    return run_child(__file__, args, timeout)


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run by wall clock (the one least disturbed by other load), the best CPU-time
    rate of all runs, and every run's samples/s."""
    timed = [r for r in runs if "samples_per_s" in r]
    if not timed:
        return runs[-1]
    best = dict(max(timed, key=lambda r: r["samples_per_s"]))
    best["cpu_samples_per_s"] = max(r["cpu_samples_per_s"] for r in timed)
    best["runs"] = [r["samples_per_s"] for r in timed]
    return best


def verdict(ratio: float, goal: float) -> str:
    return "PASS" if ratio >= goal else "FAIL"


GOALS = (("deepctr", 2.0), ("fuxictr", 2.0), ("hand", 0.9))  # dnis (sparse_adam) / side >= goal


def report(configs: list[tuple[int, dict[str, Any], dict[str, Any]]], args, machine: str) -> str:
    """The section: the setup once, then one table per vocabulary size."""
    lines = [
        "# Training throughput",
        "",
        f"DeepFM (width {WIDTH}, MLP {'-'.join(map(str, HIDDEN))}, batch {BATCH}, lr {LR}) on "
        f"synthetic Criteo-shaped data: {args.rows:,} rows (80% train, 10% held-out test), 26 "
        "categorical Zipf fields + 13 numeric fields bucketised into ids (39 fields). One epoch "
        f"after {args.warmup} warm-up batches, 1 torch thread, one process per side, run one "
        f"after the other, {args.repeats} round(s). samples/s = training rows / wall seconds of "
        "the epoch (the best round; every round in the last column); CPU samples/s = training "
        "rows / CPU seconds of the process in that epoch (best round), which other jobs on a "
        "shared machine stretch less. AUC on the held-out test rows after that epoch. Peers keep "
        "their own loaders, initialisation and training steps; all sides train the same "
        "objective (no regularisation). `benchmarks/throughput_peers.py`.",
        "",
        f"Machine: {machine}. {args.note}".rstrip(),
    ]
    for vocab, info, results in configs:
        ours = results.get("dnis-sparse", {})
        lines += [
            "",
            f"## {vocab:,} ids per categorical field ({info['ids']:,} table rows in all)",
            "",
            f"{info['train']:,} training rows, {info['test']:,} test rows. Ratio = dnis "
            "(sparse_adam) / side, by wall-clock (by CPU time).",
            "",
            "| side | samples/s | CPU samples/s | epoch s | test AUC | ratio | version | "
            "rounds (samples/s) |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for side in args.sides:
            r = results[side]
            if "skipped" in r:
                lines.append(f"| {LABELS[side]} | skipped: {r['skipped']} | | | | | | |")
                continue
            ratio = "n/a"
            if "samples_per_s" in ours:
                wall = ours["samples_per_s"] / r["samples_per_s"]
                cpu = ours["cpu_samples_per_s"] / r["cpu_samples_per_s"]
                ratio = f"{wall:.2f}x ({cpu:.2f}x)"
            rounds = ", ".join(f"{x:,.0f}" for x in r["runs"])
            lines.append(
                f"| {LABELS[side]} | {r['samples_per_s']:,.0f} | {r['cpu_samples_per_s']:,.0f} | "
                f"{r['seconds']:.1f} | {r['auc']:.4f} | {ratio} | {r['version']} | {rounds} |"
            )
        goals = []
        for side, goal in GOALS:
            r = results.get(side, {})
            if "samples_per_s" in ours and "samples_per_s" in r:
                wall = ours["samples_per_s"] / r["samples_per_s"]
                cpu = ours["cpu_samples_per_s"] / r["cpu_samples_per_s"]
                goals.append(
                    f"vs {LABELS[side]} (goal >= {goal}x) {wall:.2f}x by wall clock "
                    f"({verdict(wall, goal)}), {cpu:.2f}x by CPU time ({verdict(cpu, goal)})"
                )
        if goals:
            lines += ["", "dnis (sparse_adam): " + "; ".join(goals) + "."]
        ceiling = ceiling_line(results)
        if ceiling:
            lines += ["", ceiling]
    return "\n".join(lines) + "\n"


def ceiling_line(results: dict[str, dict[str, Any]]) -> str:
    """How far any implementation of this model can lead the peers here: the hand-written loop
    (the same model and steps, no framework) against each peer, by CPU time."""
    hand = results.get("hand", {})
    peers = [side for side in ("deepctr", "fuxictr") if "samples_per_s" in results.get(side, {})]
    if "samples_per_s" not in hand or not peers:
        return ""
    ratios = ", ".join(
        f"{hand['cpu_samples_per_s'] / results[side]['cpu_samples_per_s']:.2f}x {LABELS[side]}'s"
        for side in peers
    )
    return (
        f"Ceiling: the hand-written loop (the same model and steps with no framework) runs at "
        f"{ratios} CPU samples/s here; where that is below 2x, the dense layers' work, which "
        "every implementation shares, bounds the lead any library can take."
    )


def measure(args, vocab: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Generate one data set, run every side on it `args.repeats` times; the best run of each."""
    with tempfile.TemporaryDirectory(prefix="throughput-peers-") as tmp:
        data_path = Path(tmp) / "data.pt"
        info = make_data(args.rows, vocab, data_path)
        print(
            f"data: {info['train']:,} training rows, {info['fields']} fields, {info['ids']:,} ids "
            f"({vocab:,} per categorical field), generated in {info['seconds']:.0f} s",
            flush=True,
        )
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
        for repeat in range(args.repeats):
            for side in args.sides:
                if runs[side] and "skipped" in runs[side][-1]:
                    continue  # a peer that cannot run is not retried
                r = run_side(side, data_path, args.warmup, args.timeout)
                runs[side].append(r)
                shown = r.get("skipped") or (
                    f"{r['samples_per_s']:,.0f} samples/s ({r['seconds']:.1f} s; "
                    f"{r['cpu_samples_per_s']:,.0f} by CPU time), AUC {r['auc']:.4f}"
                )
                print(f"[{repeat + 1}/{args.repeats}] {LABELS[side]:32s} {shown}", flush=True)
    return info, {side: best_run(side_runs) for side, side_runs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows generated (80%% train)")
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="ids per categorical field; one data set and one table per value",
    )
    parser.add_argument("--warmup", type=int, default=10, help="warm-up batches before the epoch")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all sides")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per side")
    parser.add_argument("--note", default="", help="extra text after the machine line")
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    parser.add_argument("--data", help=argparse.SUPPRESS)  # the child's data file
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.warmup)
        return

    import torch
    from _common import machine, write_section

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    configs = [(vocab, *measure(args, vocab)) for vocab in args.vocab]
    load = max(load, os.getloadavg()[0])
    shared = f"shared with other jobs (1-minute load average up to {load:.1f} at start/end)"
    text = report(configs, args, f"{machine()}; {shared}")
    print()
    print(text)
    if not args.no_write:
        write_section(args.out, "throughput", text)
        print(f"written to the 'throughput' section of {args.out}")


if __name__ == "__main__":
    main()
