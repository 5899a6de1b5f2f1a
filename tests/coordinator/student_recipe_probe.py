"""Probe: variants of the distilling student recipe on the digits-cnn student (BENCHMARKS.md).

Replays ``fedsqueeze distill OUT --task digits-cnn --compress --shift 0 --seed S`` step by
step (same teacher training, proxy split, seeds and recipe: the empty variant gives the
command's figures bit for bit) with one thing changed, given as a JSON object:

* ``{"aug": {"shift": 1}}``: every distillation batch also gets a copy moved by up to one
  pixel (the per-row loop here draws the same offsets as ``coordinator.distill.translate``,
  so it equals the command's ``--shift 1``);
* ``{"prune": "cubic", "n": 20, "k": 10, "last": 50}``: gradual pruning on Zhu & Gupta's
  cubic schedule, ``n`` steps of ``k`` epochs, the last one ``last`` epochs;
* ``{"qat": 30, "qatlr": 1e-3}``: straight-through k-means training before the sharing;
* ``{"cos": 1, "lastlr": 3e-3}``: the last pruning step at another learning rate;
* ``{"caug": 2}``: the centroid tuning on the proxy plus 2 translated and 2 mixed copies;
* ``{"arch": [6, 12], "schedule": [...]}``: another DigitsCNN width and schedule.

    python -m tests.coordinator.student_recipe_probe '{"aug": {"shift": 1}}' 0,1,2,3,4,5

One line of JSON per seed, then the losses against the teacher (points). Teachers are cached
under /tmp. Deterministic; one thread.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coordinator.distill import (
    DistillConfig,
    DistillResult,
    TeacherFn,
    distillation_loss,
    logits_of,
)
from coordinator.distill import distill as plain_distill
from fedsqueeze.codec import EncodedModel, FloatFormat, decode_state, encode_state
from fedsqueeze.codec.kmeans import assign, kmeans_codebook
from fedsqueeze.codec.pruning import global_magnitude_masks
from fedsqueeze.recipes import DeepCompressionConfig, recipe_spec
from fedsqueeze.recipes.deep_compression import round_float
from fedsqueeze.recipes.weight_sharing import finetune_centroids, share_weights, shared_state
from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.proxy import split_proxy

torch.set_num_threads(1)
TASK = sys.argv[3] if len(sys.argv) > 3 else "digits-cnn"
task = get_task(TASK)
data = task.load_data()


def teacher_for(seed: int) -> torch.nn.Module:
    path = Path(f"/tmp/student3-teacher-{TASK}-{seed}.pt")
    teacher = task.build_model(seed)
    if path.exists():
        teacher.load_state_dict(torch.load(path))
        return teacher
    _, rest = split_proxy(data, 360)
    for epoch in range(30):  # as the command does
        task.train(
            teacher,
            rest.x_train,
            rest.y_train,
            epochs=1,
            lr=0.05,
            batch_size=32,
            seed=seed * 1000 + epoch,
        )
    torch.save(teacher.state_dict(), path)
    return teacher


def acc(m: torch.nn.Module) -> float:
    return task.evaluate(m, data.x_test, data.y_test).accuracy


def agreement(m: nn.Module, teach: TeacherFn, x: Tensor) -> float:
    with torch.no_grad():
        m.eval()
        return float((m(x).argmax(1) == teach(x).argmax(1)).float().mean())


def cubic(final: float, start: float, steps: int) -> list[float]:
    return [final + (start - final) * (1 - (i + 1) / steps) ** 3 for i in range(steps)]


def shift_batch(xb: Tensor, gen: torch.Generator, r: int) -> Tensor:
    # random translation by up to r pixels, zero fill (8x8 digits)
    b = xb.shape[0]
    pad = F.pad(xb, (r, r, r, r))
    dx = torch.randint(0, 2 * r + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * r + 1, (b,), generator=gen)
    h, w = xb.shape[-2:]
    out = torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return out


def my_distill(
    student: nn.Module,
    teacher: TeacherFn,
    x: Tensor,
    config: DistillConfig,
    *,
    masks: Mapping[str, Tensor] | None = None,
    aug: dict[str, Any],
) -> DistillResult:
    from fedsqueeze.tasks.training import apply_masks, make_optimizer

    model = copy.deepcopy(student)
    params = dict(model.named_parameters())
    masked = [(params[n], m.to(torch.bool)) for n, m in (masks or {}).items()]
    apply_masks(masked)
    opt = make_optimizer(config.optimizer, list(params.values()), config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    n = int(x.shape[0])
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            xb = x[rows]
            b = int(rows.shape[0])
            lam = torch.rand(b, generator=gen).view(-1, 1, 1, 1)
            partner = xb[torch.randperm(b, generator=gen)]
            parts = [xb, lam * xb + (1 - lam) * partner]
            if aug.get("shift"):
                parts.append(shift_batch(xb, gen, aug["shift"]))
            if aug.get("noise"):
                parts.append(xb + aug["noise"] * torch.randn(xb.shape, generator=gen))
            xb = torch.cat(parts)
            loss = distillation_loss(model(xb), teacher(xb), config.temperature)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            for p, m in masked:
                if p.grad is not None:
                    p.grad.masked_fill_(~m, 0.0)
            opt.step()
            apply_masks(masked)
    model.eval()
    return DistillResult(student=model, loss=0.0, seconds=0.0)


def run(seed: int, v: dict[str, Any]) -> dict[str, Any]:
    def distill(
        s: nn.Module,
        t: TeacherFn,
        x: Tensor,
        c: DistillConfig,
        masks: Mapping[str, Tensor] | None = None,
    ) -> DistillResult:
        if v.get("aug"):
            return my_distill(s, t, x, c, masks=masks, aug=v["aug"])
        return plain_distill(s, t, x, c, masks=masks)

    teacher = teacher_for(seed)
    teach = logits_of(teacher)
    proxy, _ = split_proxy(data, 360)
    x = proxy.x
    cfg = DistillConfig(temperature=4.0, epochs=v.get("dense", 200), lr=1e-2, seed=seed)
    default = (0.5, 0.7, 0.8, 0.86, v.get("final", 0.91))
    recipe = DeepCompressionConfig(
        schedule=tuple(v.get("schedule", default)),
        finetune_epochs=50,
        centroid_lr=3e-3,
        centroid_epochs=v.get("centroid", 20),
    )
    spec = recipe_spec(recipe)
    out = {"seed": seed, "teacher": acc(teacher)}
    if v.get("arch"):
        from fedsqueeze.tasks.models import DigitsCNN, build_seeded

        ch, hid = v["arch"]
        st = build_seeded(lambda: DigitsCNN(channels=tuple(ch), hidden=hid), seed)
    elif task.build_student is not None:
        st = task.build_student(seed)
    else:
        raise ValueError(f"task {TASK!r} has no student")
    out["params"] = sum(p.numel() for p in st.parameters())
    model = distill(st, teach, x, cfg).student
    out["dense"] = acc(model)
    targets = [
        n for n, p in model.named_parameters() if spec.is_target(n, p.ndim, p.is_floating_point())
    ]
    mode = v.get("prune", "steps")
    if mode == "steps":
        sched = [(s, v.get("ft", 50)) for s in v.get("schedule", (0.5, 0.7, 0.8, 0.86, 0.91))]
        sched[-1] = (sched[-1][0], v.get("lastft", sched[-1][1]))
    else:  # cubic: n steps of k epochs each, then a final fine-tune
        n, k = v.get("n", 20), v.get("k", 10)
        sched = [(s, k) for s in cubic(v.get("final", 0.91), v.get("s0", 0.0), n)]
        sched[-1] = (sched[-1][0], v.get("last", 50))
    masks = {}
    for i, (s, ep) in enumerate(sched):
        params = dict(model.named_parameters())
        masks = global_magnitude_masks({n: params[n].detach() for n in targets}, s)
        c = replace(cfg, epochs=ep, seed=seed + i + 1)
        if v.get("cos") and i == len(sched) - 1:
            c = replace(c, lr=v.get("lastlr", 1e-2))
        model = distill(model, teach, x, c, masks=masks).student
    out["pruned"] = acc(model)
    out["pruned_agree"] = agreement(model, teach, x)
    # QAT (straight-through): forward with nearest-centroid weights, grads into the fp ones
    if v.get("qat", 0):
        model = qat(model, masks, teach, x, v["qat"], v.get("qatlr", 3e-3), seed, recipe.bits)
        out["qat"] = acc(model)
    xc = x
    if v.get("caug"):
        g = torch.Generator().manual_seed(seed + 4242)
        parts = [x]
        for _ in range(v["caug"]):
            parts.append(shift_batch(x, g, 1))
            lam = torch.rand(x.shape[0], generator=g).view(-1, 1, 1, 1)
            parts.append(lam * x + (1 - lam) * x[torch.randperm(x.shape[0], generator=g)])
        xc = torch.cat(parts)
    tl = teach(xc)
    shared = share_weights(model.state_dict(), masks, recipe.bits)
    shared = finetune_centroids(
        model,
        shared,
        xc,
        tl,
        epochs=recipe.centroid_epochs,
        lr=recipe.centroid_lr,
        batch_size=64,
        seed=seed + 999,
        loss_fn=lambda s, t: distillation_loss(s, t, 4.0),
    )
    comp = shared_state(model, shared)
    comp = {n: t if n in shared else round_float(t, FloatFormat.FP16) for n, t in comp.items()}
    blob = encode_state(comp, spec).to_bytes()
    model.load_state_dict(decode_state(EncodedModel.from_bytes(blob)))
    out["final"] = acc(model)
    out["bytes"] = len(blob)
    out["loss"] = round(100 * (out["teacher"] - out["final"]), 2)
    return out


def qat(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    teach: TeacherFn,
    x: Tensor,
    epochs: int,
    lr: float,
    seed: int,
    bits: int,
) -> nn.Module:
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam([p for p in params.values()], lr=lr)
    gen = torch.Generator().manual_seed(seed + 555)
    from torch.func import functional_call

    n = x.shape[0]
    model.train()
    for _ in range(epochs):
        books = {}
        for name, m in masks.items():
            kept = params[name].detach().reshape(-1)[m.reshape(-1)]
            books[name] = kmeans_codebook(kept, bits)
        order = torch.randperm(n, generator=gen)
        for st in range(0, n, 64):
            rows = order[st : st + 64]
            xb = x[rows]
            lam = torch.rand(len(rows), generator=gen).view(-1, 1, 1, 1)
            partner = xb[torch.randperm(len(rows), generator=gen)]
            xb = torch.cat([xb, lam * xb + (1 - lam) * partner])
            p2: dict[str, Tensor] = dict(params)
            for name, m in masks.items():
                w = params[name]
                q = books[name][assign(w.detach().reshape(-1), books[name]).long()].view_as(w)
                p2[name] = (w + (q - w).detach()) * m
            s = functional_call(model, p2, (xb,))
            loss = distillation_loss(s, teach(xb), 4.0)
            opt.zero_grad()
            torch.autograd.backward(loss)
            for name, m in masks.items():
                grad = params[name].grad
                if grad is not None:
                    grad.masked_fill_(~m, 0)
            opt.step()
            with torch.no_grad():
                for name, m in masks.items():
                    params[name].mul_(m)
    model.eval()
    return model


if __name__ == "__main__":
    variant = json.loads(sys.argv[1])
    seeds = [int(s) for s in sys.argv[2].split(",")]
    rows = []
    for s in seeds:
        t = time.time()
        r = run(s, variant)
        r["sec"] = round(time.time() - t, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
    losses = sorted(r["loss"] for r in rows)
    print(
        "VARIANT",
        json.dumps(variant),
        "losses",
        losses,
        "max",
        max(losses),
        "bytes max",
        max(r["bytes"] for r in rows),
        flush=True,
    )
