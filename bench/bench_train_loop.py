"""Benchmark openworld's classifier train loop against references measured in the same run.

Command (from the repository root; about a minute on 2 idle CPU cores, several when other processes share them):

    .venv/bin/python bench/bench_train_loop.py --dataset digits --epochs 10 --batch-size 128 --repeats 5

Other runs (see BENCHMARKS.md for the figures they print):

    .venv/bin/python bench/bench_train_loop.py --dataset digits --backbone mlp --epochs 10 --batch-size 128 --repeats 5
    .venv/bin/python bench/bench_train_loop.py --dataset fashion_mnist --train-size 10000 --epochs 1 --repeats 3

On one model, one training set, one batch size, one optimizer (SGD lr 0.05, momentum 0.9, no
Nesterov, no weight decay, constant LR) and one number of epochs, it times:

(a) openworld: ``train_classifier`` driven by a ``RunContext`` on a ``TensorData`` (the in-memory
    fast path: the tensor is moved to the device once, batches are index slices); ``selection="last"``
    so no validation pass runs;
(b) plain PyTorch: ``TensorDataset`` + ``DataLoader(shuffle=True, batch_size, num_workers=0)`` and the
    usual zero_grad / forward / cross-entropy / backward / step loop;
(c) Avalanche ``Naive`` on one experience built with ``avalanche.benchmarks.tensors_benchmark`` from
    the same tensors, with an ``EvaluationPlugin`` holding no metrics and no loggers and no periodic
    evaluation (skipped with a note if Avalanche is missing or with ``--no-avalanche``).

All three train the same network (``RunContext.create_classifier_net``: the backbone + a cosine
head, temperature 16, forward returning logits over all classes), initialised from the same seed,
on the same pre-normalised float32 tensor (so no path pays for a transform the others skip), with
the last batch kept (same number of optimizer steps; each path's step count is checked). Each path
is warmed up once with a 1-epoch run; then the paths are run in turn, ``--repeats`` times, and the
median wall time of the training call is reported (model and optimizer construction are outside
the timed region; Avalanche's per-experience setup inside ``train`` is inside it). After the last
repeat each model's accuracy on the training set and on (up to ``--eval-size``) test samples is
printed, so a loop that skipped work would show. ``ratio`` = reference time / openworld time
(> 1: openworld is faster). ``torch.set_num_threads`` is left at its default unless ``--threads``
is given. The CPU time of the process (all threads) is printed beside the wall time: other processes
on the same cores inflate the wall time of single repeats many-fold (the load average is printed).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openworld.data.sources import load_digits, load_fashion_mnist
from openworld.data.views import TensorData
from openworld.strategies.base import OptimizerConfig, RunContext, TrainConfig, train_classifier

DEFAULT_BACKBONE = {"digits": "cnn8", "fashion_mnist": "cnn28"}
LR, MOMENTUM = 0.05, 0.9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) since ``t0 = clock()``."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def load_data(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 normalised train/test tensors (the source's own test transform, applied once)."""
    if args.dataset == "digits":
        src = load_digits()
    else:
        src = load_fashion_mnist(root=args.root)
    tf = src.train.transforms.test if src.train.transforms is not None else (lambda t: t.float())
    x_tr, y_tr = tf(src.train.x).float().contiguous(), src.train.targets.clone()
    x_te, y_te = tf(src.test.x).float().contiguous(), src.test.targets.clone()
    gen = torch.Generator().manual_seed(0)
    if args.train_size and args.train_size < len(y_tr):
        idx = torch.randperm(len(y_tr), generator=gen)[: args.train_size]
        x_tr, y_tr = x_tr[idx].contiguous(), y_tr[idx].contiguous()
    if args.eval_size and args.eval_size < len(y_te):
        idx = torch.randperm(len(y_te), generator=gen)[: args.eval_size]
        x_te, y_te = x_te[idx].contiguous(), y_te[idx].contiguous()
    return x_tr, y_tr, x_te, y_te


def make_context(args, input_shape, num_classes: int, epochs: int) -> RunContext:
    base = TrainConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        optimizer=OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM, nesterov=False, weight_decay=0.0),
        schedule="constant",
        selection="last",
    )
    return RunContext(
        device="cpu",
        seed=0,
        scenario={"input_shape": list(input_shape), "num_classes": num_classes, "fingerprint": "bench"},
        backbone={"name": args.backbone},
        base=base,
        progress=False,
    )


def fresh_model(ctx: RunContext) -> torch.nn.Module:
    torch.manual_seed(0)  # same initial weights for every path and repeat
    return ctx.create_classifier_net().train()


def plain_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


# ------------------------------------------------------------------------------------------------
# The three paths: each returns (seconds of the training call, optimizer steps, trained model)
# ------------------------------------------------------------------------------------------------
def run_openworld(args, data: TensorData, input_shape, num_classes: int, epochs: int):
    ctx = make_context(args, input_shape, num_classes, epochs)
    model = fresh_model(ctx)
    gen = torch.Generator().manual_seed(0)
    t0 = clock()
    train_classifier(model, data, cfg=ctx.base, ctx=ctx, num_active=num_classes, selection_data=None, generator=gen)
    elapsed = since(t0)
    return elapsed, ctx.global_step, model


def run_plain(args, x: torch.Tensor, y: torch.Tensor, input_shape, num_classes: int, epochs: int):
    from torch.utils.data import DataLoader, TensorDataset

    model = fresh_model(make_context(args, input_shape, num_classes, epochs))
    opt = plain_optimizer(model)
    t0 = clock()
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, num_workers=0)
    steps = 0
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    elapsed = since(t0)
    return elapsed, steps, model


def import_avalanche():
    try:
        from avalanche.benchmarks import tensors_benchmark
        from avalanche.core import SupervisedPlugin
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import Naive
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        return None, f"{type(exc).__name__}: {exc}"
    return (tensors_benchmark, SupervisedPlugin, EvaluationPlugin, Naive), None


def make_avalanche_experience(ava, x, y, x_te, y_te):
    tensors_benchmark = ava[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench = tensors_benchmark(train_tensors=[(x, y)], test_tensors=[(x_te, y_te)], task_labels=[0])
    return bench.train_stream[0]


def run_avalanche(args, ava, experience, input_shape, num_classes: int, epochs: int, count_samples: bool = False):
    _, SupervisedPlugin, EvaluationPlugin, Naive = ava
    model = fresh_model(make_context(args, input_shape, num_classes, epochs))
    opt = plain_optimizer(model)
    seen = [0]
    plugins = []
    if count_samples:  # warm-up only: checks that every sample is seen once per epoch

        class CountSamples(SupervisedPlugin):
            def after_training_iteration(self, strategy, **kwargs):
                seen[0] += len(strategy.mb_y)

        plugins.append(CountSamples())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified": intended
        evaluator = EvaluationPlugin(loggers=[])
        strategy = Naive(
            model=model,
            optimizer=opt,
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=args.batch_size,
            train_epochs=epochs,
            eval_mb_size=args.batch_size,
            device="cpu",
            plugins=plugins,
            evaluator=evaluator,
            eval_every=-1,
        )
    torch.manual_seed(0)
    t0 = clock()
    strategy.train(experience)
    elapsed = since(t0)
    return elapsed, strategy.clock.train_iterations, model, seen[0]


# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(y), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    p.add_argument("--root", default=os.environ.get("OPENWORLD_DATA") or str(Path("..") / "shared" / "data"),
                   help="data root for fashion_mnist (default: $OPENWORLD_DATA, else ../shared/data)")
    p.add_argument("--backbone", default=None, help="backbone name (default: cnn8 on digits, cnn28 on fashion_mnist)")
    p.add_argument("--train-size", type=int, default=10000,
                   help="random training subset (seed 0) when the set is larger (default 10000)")
    p.add_argument("--eval-size", type=int, default=2000, help="test samples used for the accuracy check")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-avalanche", action="store_true", help="skip the Avalanche Naive path")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: not called; torch's default is used)")
    p.add_argument("--json", metavar="PATH", help="also store the table (openworld.report.write_bench_result)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backbone = args.backbone or DEFAULT_BACKBONE[args.dataset]

    how = "--threads" if args.threads else "default, not set"
    load_start = load_average()
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} ({how}) | CPU: {cpu_name()} "
          f"| {os.cpu_count()} logical cores | python {platform.python_version()} | load average {load_start}")
    x, y, x_te, y_te = load_data(args)
    input_shape = tuple(x.shape[1:])
    num_classes = int(max(y.max(), y_te.max())) + 1
    n = len(y)
    steps_per_epoch = -(-n // args.batch_size)
    expected_steps = steps_per_epoch * args.epochs
    print(f"data: {args.dataset} train {n} x {list(input_shape)} float32, {num_classes} classes, "
          f"test check {len(y_te)} | backbone {args.backbone} + cosine head | batch {args.batch_size}, "
          f"epochs {args.epochs}, {expected_steps} steps | SGD lr {LR} momentum {MOMENTUM}, constant LR "
          f"| median of {args.repeats} after 1 warm-up epoch per path")

    data = TensorData(x, y, None, name=f"{args.dataset}/train")
    paths: dict[str, Callable] = {
        "openworld train_classifier (TensorData)": lambda e: run_openworld(args, data, input_shape, num_classes, e),
        "plain PyTorch (TensorDataset+DataLoader)": lambda e: run_plain(args, x, y, input_shape, num_classes, e),
    }
    published = {  # each path's name in the published table (--json)
        "openworld train_classifier (TensorData)": "openworld `train_classifier` on `TensorData`",
        "plain PyTorch (TensorDataset+DataLoader)": "plain PyTorch (`TensorDataset` + `DataLoader`)",
    }
    ava, why = (None, "--no-avalanche") if args.no_avalanche else import_avalanche()
    if ava is None:
        print(f"note: Avalanche path skipped ({why})")
    else:
        import avalanche

        experience = make_avalanche_experience(ava, x, y, x_te, y_te)
        label = f"Avalanche {avalanche.__version__} Naive"
        paths[label] = lambda e: run_avalanche(args, ava, experience, input_shape, num_classes, e)[:3]
        published[label] = f"Avalanche {avalanche.__version__} `Naive`"
        # warm-up with a sample counter: Avalanche must see each training sample once per epoch
        _, w_steps, _, seen = run_avalanche(args, ava, experience, input_shape, num_classes, 1, count_samples=True)
        if (w_steps, seen) != (steps_per_epoch, n):
            raise SystemExit(f"Avalanche warm-up: {w_steps} steps / {seen} samples, expected {steps_per_epoch} / {n}")

    for name, fn in paths.items():  # warm-up (1 epoch each; Avalanche's was done above)
        if not name.startswith("Avalanche"):
            fn(1)

    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    models = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():  # interleaved, so drift in machine speed hits every path alike
            (wall, cpu_s), steps, model = fn(args.epochs)
            if steps != expected_steps:
                raise SystemExit(f"{name}: {steps} optimizer steps, expected {expected_steps}")
            times[name].append(wall)
            cpu[name].append(cpu_s)
            models[name] = model

    ref = "openworld train_classifier (TensorData)"
    t_ref, t_ref_min = statistics.median(times[ref]), min(times[ref])
    samples = n * args.epochs
    header = (f"{'path':<42} {'median s':>9} {'min s':>8} {'steps/s':>8} {'samples/s':>10} "
              f"{'ratio':>6} {'ratio(min)':>10} {'cpu s':>7} {'train acc':>9} {'test acc':>8}")
    digits = max(0, 2 - math.floor(math.log10(t_ref))) if t_ref > 0 else 3  # 3 significant digits of openworld's
    rows, accs, min_ratios = [], [], []
    print()
    print(header)
    print("-" * len(header))
    for name in paths:
        t = statistics.median(times[name])
        t_min = min(times[name])
        acc_tr, acc_te = accuracy(models[name], x, y), accuracy(models[name], x_te, y_te)
        print(f"{name:<42} {t:>9.3f} {t_min:>8.3f} {expected_steps / t:>8.1f} {samples / t:>10.0f} "
              f"{t / t_ref:>6.2f} {t_min / t_ref_min:>10.2f} {statistics.median(cpu[name]):>7.2f} "
              f"{acc_tr:>9.3f} {acc_te:>8.3f}")
        rows.append([args.backbone, published[name], f"{t:.{digits}f}", f"{samples / t:.0f}",
                     "—" if name == ref else f"{t / t_ref:.2f}×"])
        short = name.split(" ")[0]
        accs.append(f"{short} {acc_tr:.3f} / {acc_te:.3f}")
        if name != ref:
            min_ratios.append(f"{short} {t_min / t_ref_min:.2f}×")
    print("\nratio = path median time / openworld median time, ratio(min) = the same with the fastest "
          "repeat of each (> 1: openworld faster); steps/s and samples/s from the median; cpu s = median "
          "CPU seconds of the process (all threads; idle-spinning threads count); all wall times: "
          + "; ".join(f"{k.split(' ')[0]} {[round(v, 3) for v in vs]}" for k, vs in times.items()))
    load_end = load_average()
    print(f"load average at the end: {load_end} (other processes on these cores make the times noisy)")
    if args.json:
        from openworld.report import write_bench_result

        table = {"columns": ["model", "path", "median s", "samples/s", "ratio"], "rows": rows}
        notes = [f"{args.dataset}: {n:,} training images {list(input_shape)} as one float32 tensor, {num_classes} "
                 f"classes; `{args.backbone}` + cosine head, batch {args.batch_size}, {args.epochs} epochs = "
                 f"{expected_steps} SGD steps (lr {LR}, momentum {MOMENTUM}, constant LR); median wall time of the "
                 f"training call over {args.repeats} interleaved repeats after a 1-epoch warm-up per path; "
                 f"torch threads {torch.get_num_threads()} ({how}). `ratio` = path time / openworld time.",
                 f"Accuracy after the last repeat, train / test ({len(y_te):,} test samples): " + ", ".join(accs) + ".",
                 (f"Fastest repeat of each, ratio to openworld's: {', '.join(min_ratios)}. " if min_ratios else "")
                 + f"Load average at the start {load_start}, at the end {load_end}."]
        if ava is None:
            notes.append(f"Avalanche path skipped ({why}).")
        write_bench_result(args.json, [table], notes, params=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
