"""Train the small default Vim or VMamba on Fashion-MNIST (seeded, CPU-friendly).

    OMP_NUM_THREADS=2 python examples/train_fmnist.py --model vim      # -> qmamba_ao/weights/vim_fmnist.pth
    OMP_NUM_THREADS=1 python examples/train_fmnist.py --model vmamba   # -> qmamba_ao/weights/vmamba_fmnist.pth

(The thread counts the packaged weights were trained with; the Vim on both cores of a 2-core
machine, 5-6 minutes per epoch: the "minutes" column of its training log.)

Writes the checkpoint (a bare state dict under "model", plus "config" and "log"), and a JSON log
next to it. Every random choice comes from ``--seed``; on the same machine and thread count the
run repeats exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

import qmamba_ao.models  # noqa: F401  (timm registration)
from qmamba_ao.api import QMambaError, atomic_write, check_output
from qmamba_ao.data import FMNIST_MEAN, FMNIST_STD, fashion_mnist
from qmamba_ao.models.vim import FMNIST_ARCH
from qmamba_ao.models.vmamba import VMAMBA_FMNIST_ARCH

#: --model -> (timm architecture the weights belong to, its Fashion-MNIST overrides)
MODELS = {
    "vim": ("vim_tiny_patch16_224", FMNIST_ARCH),
    "vmamba": ("vmamba_tiny_s1l8", VMAMBA_FMNIST_ARCH),
}
#: --model -> the recipe the packaged weights were trained with (epochs, shift augmentation)
RECIPES = {"vim": {"epochs": 10, "shift": 0}, "vmamba": {"epochs": 6, "shift": 2}}


def _as_tensors(train: bool, data: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    ds = fashion_mnist(train=train, path=data)
    x = ds.data.float().div_(255).sub_(FMNIST_MEAN[0]).div_(FMNIST_STD[0]).unsqueeze(1)
    return x, ds.targets.clone()


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Random shifts of up to ``shift`` pixels and horizontal flips, done on whole batches."""
    b = x.shape[0]
    if shift:
        pad = F.pad(x, (shift,) * 4, value=float(-FMNIST_MEAN[0] / FMNIST_STD[0]))
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
        x = pad[:, :, dy : dy + 28, dx : dx + 28]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch)
    )
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="vim")
    ap.add_argument("--output", default=None, help="default: qmamba_ao/weights/<model>_fmnist.pth")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: QMAMBA_DATA or Debian's package)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 (vim), 6 (vmamba)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--shift",
        type=int,
        default=None,
        help="random shift augmentation in pixels, 0: flips only (default: 0 vim, 2 vmamba)",
    )
    ap.add_argument("--device", default="cpu", help="cpu (the reference recipe) or cuda")
    ap.add_argument("--max-steps", type=int, default=0, help="stop early (timing runs)")
    ap.add_argument("--arch", default=None, help="timm overrides as JSON (default: the packaged model's)")
    ap.add_argument("--init", default=None, help="continue from this checkpoint (a file this script wrote)")
    args = ap.parse_args()
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    torch.manual_seed(args.seed)
    name, default_arch = MODELS[args.model]
    arch = json.loads(args.arch) if args.arch else json.loads(json.dumps(default_arch))
    args.output = args.output or f"qmamba_ao/weights/{args.model}_fmnist.pth"
    try:  # before training: a path that cannot be written fails now, not after the last epoch
        out = check_output(args.output, "file", "--output")
        check_output(out.with_suffix(".json"), "file", "--output")
    except QMambaError as e:
        ap.error(str(e))
    model = timm.create_model(name, **arch).to(args.device)
    previous = None
    if args.init:  # a second cosine cycle from a finished run (its config and log are kept)
        previous = torch.load(args.init, map_location="cpu", weights_only=True)
        model.load_state_dict(previous["model"])
    xtr, ytr = (t.to(args.device) for t in _as_tensors(True, args.data))
    xte, yte = (t.to(args.device) for t in _as_tensors(False, args.data))
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(xtr) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    log = []
    step = 0
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen).to(args.device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for i in bar:
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(_augment(xtr[idx], gen, args.shift)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if args.max_steps and step >= args.max_steps:
                break
        acc = evaluate(model, xte, yte)
        log.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "loss": loss.item(),
                "test_top1": acc,
                "minutes": (time.time() - t0) / 60,
            }
        )
        print(json.dumps(log[-1]))
        if args.max_steps and step >= args.max_steps:
            break
    config = {
        "model": name,
        "overrides": arch,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "shift": args.shift,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "init": None if previous is None else {"path": args.init, "config": previous["config"], "log": previous["log"]},
    }
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(out, lambda p: torch.save({"model": state, "config": config, "log": log}, p), label="--output")
    text = json.dumps({"config": config, "log": log}, indent=1)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(text), label="--output")
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB), test top-1 {log[-1]['test_top1']:.4f}")


if __name__ == "__main__":
    main()
