"""Distil a saved model (the teacher) into the task's smaller student, offline.

Examples::

    fedsqueeze distill student.pt --task digits-cnn --teacher global.pt
    fedsqueeze distill student.fsq --task digits-cnn --compress      # BENCHMARKS.md

The student's architecture comes from the task (digits-cnn: conv 1→4→8, linear 128→32→10,
4,794 parameters; digits-mlp: 64→64→32→10). The student learns from the teacher's softened
outputs (KL · T²) on the proxy set: PROXY_SIZE examples held out of the task's training
split by a seeded permutation, never from the test split, used without labels unless
--ce-weight is given. Without --teacher, a teacher is first trained on the rest of the
training split (30 epochs of SGD, as in the Deep Compression recipe), so the run stands alone.

OUTPUT's extension picks what is written: .pt, .pth, .bin or .safetensors hold the dense
student; .fsq needs --compress, which also prunes, shares and encodes the student with the
Deep Compression recipe, distilling at every step, and reports the decoded student's
accuracy. Accuracies are on the task's test split.

With --compress the encoding is at most --max-bytes long (default: the teacher's fp32 size
divided by 200, rounded down; 765 B for digits-cnn): if the schedule's encoding is larger, the
recipe prunes 0.002 further, distils and shares again, up to --max-extra-steps times, and fails
naming the size it reached when that is not enough. The steps look at bytes only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedsqueeze.cli.argtypes import count
from fedsqueeze.errors import ConfigError, first_line

if TYPE_CHECKING:  # torch loads only when the command runs, not for --help
    from rich.console import Console
    from rich.progress import Progress
    from torch import nn

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's flags."""
    parser.add_argument("output", help="where to write the student: .pt/.safetensors, or .fsq")
    parser.add_argument("--task", default="digits-cnn", help="task name (default digits-cnn)")
    parser.add_argument(
        "--teacher", help="the teacher's state_dict (.pt or .safetensors); trained when omitted"
    )
    parser.add_argument(
        "--temperature", type=_number(0.0, strict=True), default=4.0, help="T (default 4)"
    )
    parser.add_argument(
        "--epochs", type=count(0), default=200, help="distillation epochs (default 200)"
    )
    parser.add_argument("--lr", type=_number(0.0, strict=True), default=1e-2, help="Adam lr")
    parser.add_argument(
        "--proxy-size",
        type=count(1),
        default=360,
        help="training examples held out as the unlabelled proxy set (default 360)",
    )
    parser.add_argument(
        "--ce-weight",
        type=_number(0.0),
        default=0.0,
        help="mix in cross-entropy on the proxy's labels with this weight in [0, 1] "
        "(default 0: no labels are used)",
    )
    parser.add_argument(
        "--no-mixup", action="store_true", help="train on the proxy images only, not their mixes"
    )
    parser.add_argument(
        "--shift",
        type=count(0),
        default=1,
        help="also train on copies of the proxy images moved by up to this many pixels, "
        "labelled by the teacher (default 1; 0: none; image tasks only)",
    )
    parser.add_argument(
        "--compress",
        action="store_true",
        help="also prune, share and encode the student (Deep Compression, distilling)",
    )
    parser.add_argument(
        "--max-bytes",
        type=count(0),
        default=None,
        help="with --compress: the largest encoded student accepted; extra pruning steps "
        "until it fits (default: the fp32 teacher's bytes / 200, 765 for digits-cnn; 0: no "
        "bound)",
    )
    parser.add_argument(
        "--max-extra-steps",
        type=count(0),
        default=10,
        help="with --compress: extra pruning steps of 0.002 sparsity at most (default 10)",
    )
    parser.add_argument("--seed", type=count(0), default=0, help="seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def _number(minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > minimum if strict else value >= minimum) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}")
        return value

    return parse


def _check_output(args: argparse.Namespace) -> Path:
    output = Path(args.output)
    suffix = output.suffix.lower()
    if suffix == ".fsq" and not args.compress:
        raise ConfigError(f"{output}: an .fsq output needs --compress")
    if suffix != ".fsq" and args.compress:
        raise ConfigError(f"{output}: --compress writes an encoded model; name it *.fsq")
    if suffix != ".fsq":
        from fedsqueeze.statefile import state_format

        state_format(output)
    if output.is_dir():
        raise ConfigError(f"{output} is a directory; give a file name")
    if output.exists() and not args.force:
        raise ConfigError(f"{output} exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise ConfigError(f"cannot write {output}: no such directory {output.parent}")
    if args.ce_weight > 1:
        raise ConfigError(f"--ce-weight must be in [0, 1], got {args.ce_weight}")
    if not args.compress and args.max_bytes is not None:
        raise ConfigError("--max-bytes bounds the encoded student; it needs --compress")
    return output


def main(args: argparse.Namespace) -> int:
    """Distil; returns 0."""
    output = _check_output(args)
    import torch

    from coordinator.distill import DistillConfig, distill, logits_of
    from coordinator.student_recipe import (
        STUDENT_RECIPE,
        ByteBound,
        compress_student,
        fp32_fraction_bound,
    )
    from fedsqueeze.cli.console import make_console
    from fedsqueeze.tasks import get_task
    from fedsqueeze.tasks.proxy import split_proxy

    task = get_task(args.task)
    if task.build_student is None:
        raise ConfigError(f"task {task.name!r} has no student (Task.build_student is None)")
    data = task.load_data()
    n_train = int(data.x_train.shape[0])
    if args.proxy_size >= n_train:
        raise ConfigError(
            f"--proxy-size must be < {n_train} (the training split), got {args.proxy_size}"
        )
    teacher = task.build_model(args.seed)
    if args.teacher is not None:
        _load_teacher(teacher, args.teacher)
    config = DistillConfig(
        temperature=args.temperature, epochs=args.epochs, lr=args.lr,
        ce_weight=args.ce_weight, mixup=not args.no_mixup, shift=args.shift,
        proxy_size=args.proxy_size, seed=args.seed,
    )  # fmt: skip
    proxy, rest = split_proxy(data, config.proxy_size, labelled=config.ce_weight > 0)
    console = make_console()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # results depend on the thread count: fixed, as in the recipe
    try:
        with _progress(console) as progress:
            if args.teacher is None:
                bar = progress.add_task("train the teacher", total=30)
                for epoch in range(30):
                    task.train(
                        teacher, rest.x_train, rest.y_train, epochs=1, lr=0.05,
                        batch_size=32, seed=args.seed * 1000 + epoch,
                    )  # fmt: skip
                    progress.update(bar, advance=1)

            def accuracy(model: nn.Module) -> float:
                return task.evaluate(model, data.x_test, data.y_test).accuracy

            student = task.build_student(args.seed)
            bar = progress.add_task("distil", total=config.epochs)
            if args.compress:
                max_bytes = (
                    fp32_fraction_bound(4 * _params(teacher), 200.0)
                    if args.max_bytes is None else args.max_bytes
                )  # fmt: skip
                bound = (
                    None if max_bytes == 0
                    else ByteBound(max_bytes, max_steps=args.max_extra_steps)
                )  # fmt: skip

                def step(name: str, done: int, total: int) -> None:
                    progress.update(bar, description=name, completed=done, total=total)

                result = compress_student(
                    teacher, student, proxy.x, accuracy, distill_config=config,
                    recipe=STUDENT_RECIPE, progress=step, byte_bound=bound,
                )  # fmt: skip
                dense_acc, final_acc = result.dense_accuracy, result.final_accuracy
                from fedsqueeze.statefile import write_atomic

                write_atomic(output, result.encoded.to_bytes(), overwrite=args.force)
                encoded: int | None = result.encoded_bytes
                extra, sparsity = result.extra_steps, result.sparsity
                rejected = [
                    s.step.removeprefix("encode ")
                    for s in result.history
                    if s.step.startswith("encode ")
                ]
            else:
                trained = distill(
                    student, logits_of(teacher), proxy.x, config, y=proxy.y,
                    progress=lambda done, total, loss: progress.update(bar, completed=done),
                ).student  # fmt: skip
                dense_acc = final_acc = accuracy(trained)
                from fedsqueeze.statefile import save_state

                save_state(trained.state_dict(), output, overwrite=args.force)
                encoded = None
                extra, sparsity, rejected = 0, 0.0, []
        teacher_acc = accuracy(teacher)
    finally:
        torch.set_num_threads(previous)
    t_params, s_params = _params(teacher), _params(student)
    console.print(
        f"teacher: {t_params:,} parameters, {4 * t_params:,} B fp32, test accuracy "
        f"{teacher_acc:.2%}"
    )
    console.print(
        f"student: {s_params:,} parameters ({s_params / t_params:.1%} of the teacher), "
        f"{4 * s_params:,} B fp32, test accuracy {dense_acc:.2%} (proxy: {proxy.size} "
        f"unlabelled examples{'' if proxy.y is None else ', labels used'})"
    )
    if encoded is not None:
        console.print(
            f"compressed student: {encoded:,} B ({4 * t_params / encoded:.1f}× smaller than "
            f"the fp32 teacher), decoded test accuracy {final_acc:.2%} "
            f"({100 * (teacher_acc - final_acc):.2f} points below the teacher); sparsity "
            f"{sparsity:g}"
            + (
                f" after {extra} extra pruning step{'s' * (extra != 1)} to fit (over the "
                f"bound: {', '.join(rejected)})"
                if extra
                else ""
            )
        )
    console.print(f"wrote {output}")
    return 0


def _load_teacher(model: nn.Module, path: str) -> None:
    from fedsqueeze.statefile import load_state

    state = load_state(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit the task's model: {first_line(exc)}") from exc


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _progress(console: Console) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=not console.is_terminal,
    )  # fmt: skip
