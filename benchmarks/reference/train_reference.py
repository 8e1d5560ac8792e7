"""Train the embedded reference models (class-conditional UNets on Fashion-MNIST or MNIST digits) — resumable.

    python benchmarks/reference/train_reference.py --minutes 80          # train (resumes from the checkpoint)
    python benchmarks/reference/train_reference.py --export              # write the shipped weights

Each batch is drawn at one size from ``--sizes`` (default 16, 24 and 32 px, as Stable Diffusion is trained at
several resolutions): the lower sizes are area-downsampled from the 32x32 padded images, so the model can
denoise the low-resolution phase of a mixed-resolution plan. ``--init CKPT`` starts a new run from another
run's weights (v2 was fine-tuned from v1's checkpoint).

``--objective flow`` trains the same network on a rectified flow instead (``reference-flow``, the flow-matching
reference): x_sigma = (1 - sigma) x0 + sigma noise with sigma uniform on {1, ..., 1000} / 1000, the network given the
timestep 1000 sigma (as diffusers' FlowMatch schedulers pass it) and trained to predict the velocity noise - x0, the
objective of SD3 and FLUX (without their logit-normal weighting of sigma: uniform, as the original rectified flow).

The exact command, seed and loss curve of the shipped weights are in benchmarks/reference/README.md and
loss.csv. Training is split into sittings: every ``--ckpt-every`` iterations the model, its EMA, the optimiser,
the iteration counter and every random-number state are saved to ``--ckpt`` (atomically), and a new run
continues from there, bit for bit as if it had not stopped (data order comes from a per-iteration seed).
A GPU is used when one is available (``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from postdiff_lab import data
from postdiff_lab.reference import model as ref

HERE = Path(__file__).resolve().parent
DEFAULT_CKPT = HERE / "checkpoint.pt"
WEIGHTS = {name: Path(ref.__file__).resolve().parent / folder for name, folder in ref.WEIGHT_FOLDERS.items()}


# The noise schedules a run may train with: v1 to v2.1 used the cosine schedule; v3 uses Stable Diffusion's own
# (scaled_linear, beta 0.00085 to 0.012), so every scheduler an SD user picks sees the noise levels it expects.
SCHEDULES = {
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}


# The sampling scheduler of a flow-matching run: SD3's own class; shift 1, since a 32 px image's 1,024 pixels are
# SD3's base sequence length (its shift 3 is for 4,096 tokens) and the run trained sigma uniformly.
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def scheduler_config(schedule: str, objective: str = "epsilon") -> dict:
    """The sampling scheduler config of a model trained with ``schedule`` and ``objective`` (training.json records it)."""
    if objective == "flow":
        return dict(FLOW_SCHEDULER)
    base = {k: v for k, v in ref.SCHEDULER_CONFIG.items() if k not in ("beta_schedule", "beta_start", "beta_end")}
    return {**base, **SCHEDULES[schedule]}


def weights_key(dataset: str, objective: str) -> str:
    """The shipped-weights folder key (``ref.WEIGHT_FOLDERS``) of a run."""
    return dataset if objective == "epsilon" else f"{dataset}-flow"


def ddpm_alphas(device, schedule: str) -> torch.Tensor:
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config(schedule).items() if k not in ("set_alpha_to_one", "steps_offset")}
    return DDPMScheduler(**config).alphas_cumprod.to(device)


def load_init(path: Path, device) -> dict:
    """Weights to start a new run from: a training checkpoint (.pt) or shipped weights (model.safetensors, whose EMA
    weights then start both the model and its EMA)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path), device=str(device))
        unet = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
        enc = {k.removeprefix("class_encoder."): v for k, v in tensors.items() if k.startswith("class_encoder.")}
        return {"unet": unet, "enc": enc, "ema_unet": unet, "ema_enc": enc, "step": "shipped"}
    return torch.load(path, map_location=device, weights_only=True)


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if not sizes or any(s < 8 or s > 32 or s % 4 for s in sizes):
        raise SystemExit(f"--sizes must be multiples of 4 between 8 and 32 (the UNet halves the size twice), got {text!r}")
    return sizes


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sizes = parse_sizes(args.sizes)
    images, labels = data.load("train", args.data, dataset=args.dataset)
    x_all = data.to_model_space(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    n = len(x_all)
    unet, enc = ref.build(args.seed)
    unet.to(device).train()
    enc.to(device).train()
    params = list(unet.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_unet, ema_enc = copy.deepcopy(unet).eval(), copy.deepcopy(enc).eval()
    step = 0
    ckpt = Path(args.ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists() and args.init:
        init = load_init(Path(args.init), device)
        for name, module in (("unet", unet), ("enc", enc), ("ema_unet", ema_unet), ("ema_enc", ema_enc)):
            module.load_state_dict(init[name])
        print(f"initialised from {args.init} (iteration {init['step']}, sha256 {data.sha256(Path(args.init))[:12]})", flush=True)
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        enc.load_state_dict(state["enc"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_enc.load_state_dict(state["ema_enc"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        args.init_sha256 = state["args"].get("init_sha256")  # the run's origin, whatever this sitting was given
        saved = state["args"].get("schedule", "squaredcos_cap_v2")
        if args.schedule not in (None, saved):
            raise SystemExit(f"--schedule {args.schedule}: the checkpoint {ckpt} trains {saved}; resume with --schedule {saved}")
        args.schedule = saved
        objective = state["args"].get("objective", "epsilon")
        if args.objective not in (None, objective):
            raise SystemExit(f"--objective {args.objective}: the checkpoint {ckpt} trains {objective}; resume with --objective {objective}")
        args.objective = objective
        print(f"resumed from {ckpt} at iteration {step}", flush=True)
    if args.schedule is None:  # a new run
        args.schedule = "scaled_linear"
    args.objective = args.objective or "epsilon"
    flow = args.objective == "flow"
    alphas = ddpm_alphas(device, args.schedule)

    def checkpoint(at: int) -> None:
        modules = {"unet": unet, "enc": enc, "ema_unet": ema_unet, "ema_enc": ema_enc, "opt": opt}
        save_atomic({**{k: m.state_dict() for k, m in modules.items()}, "step": at, "args": vars(args)}, ckpt)

    log = open(ckpt.with_name("loss.csv"), "a" if step else "w")
    if step == 0:
        log.write("iteration,loss,elapsed_s,lr,size\n")
    deadline = time.time() + 60 * args.minutes
    t0 = time.time()
    running, count = 0.0, 0
    while step < args.iters and time.time() < deadline:
        g = torch.Generator(device="cpu").manual_seed(args.seed * 1_000_003 + step)  # the batch of iteration `step`
        idx = torch.randint(0, n, (args.batch,), generator=g).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        noise = torch.randn(args.batch, 1, 32, 32, generator=g).to(device)
        drop = torch.rand(args.batch, generator=g).to(device) < args.cfg_dropout
        size = sizes[int(torch.randint(0, len(sizes), (1,), generator=g))]  # one size per batch
        x0, y = x_all[idx], torch.where(drop, torch.full_like(y_all[idx], ref.NULL_CLASS), y_all[idx])
        if size != 32:  # area-downsampled images; noise of the batch's own size, from the same generator stream
            x0, noise = F.interpolate(x0, size=(size, size), mode="area"), noise[..., :size, :size].contiguous()
        if flow:  # the rectified flow: sigma in (0, 1], the velocity noise - x0 as target, timestep 1000 sigma
            sigma = (t + 1).float() / 1000
            xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            t, target = sigma * 1000, noise - x0
        else:
            a = alphas[t].view(-1, 1, 1, 1)
            xt, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if args.cosine:  # cosine decay to 0 at --iters
            lr *= 0.5 * (1 + math.cos(math.pi * min(step, args.iters) / args.iters))
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(xt, t, enc(y)).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(list(ema_unet.parameters()) + list(ema_enc.parameters()), params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        step += 1
        running += loss.item()
        count += 1
        if step % args.log_every == 0:
            log.write(f"{step},{running / count:.5f},{time.time() - t0:.1f},{lr:.2e},{size}\n")
            log.flush()
            print(f"it {step} loss {running / count:.4f} ({(time.time() - t0) / 60:.1f} min this sitting)", flush=True)
            running, count = 0.0, 0
        if step % args.ckpt_every == 0:
            checkpoint(step)
    checkpoint(step)
    print(f"stopped at iteration {step}; checkpoint {ckpt}", flush=True)


def export(args) -> None:
    """EMA weights → packages/postdiff-lab/src/postdiff_lab/reference/weights[_digits] (safetensors + config)."""
    from safetensors.torch import save_file

    state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    objective = state["args"].get("objective") or "epsilon"
    weights = WEIGHTS[weights_key(state["args"].get("dataset", "fashion"), objective)]
    tensors = {f"unet.{k}": v.contiguous() for k, v in state["ema_unet"].items()}
    tensors |= {f"class_encoder.{k}": v.contiguous() for k, v in state["ema_enc"].items()}
    weights.mkdir(parents=True, exist_ok=True)
    tmp = weights / "model.safetensors.tmp"
    save_file(
        {k: v.float() for k, v in tensors.items()}, str(tmp), metadata={"iterations": str(state["step"]), "ema": str(state["args"]["ema"])}
    )
    os.replace(tmp, weights / "model.safetensors")
    run = state["args"]
    meta = {
        "dataset": run.get("dataset", "fashion"),
        "sizes": parse_sizes(run.get("sizes", "32")),
        "iterations": int(state["step"]),
        "batch": state["args"]["batch"],
        "seed": state["args"]["seed"],
        "lr": state["args"]["lr"],
        "ema": state["args"]["ema"],
        "cfg_dropout": state["args"]["cfg_dropout"],
        "cosine_to": run["iters"] if run.get("cosine") else None,
        "init_from": run.get("init_sha256"),
        "data": data.train_hashes(run.get("dataset", "fashion")),
        "unet": ref.UNET_CONFIG,
        "objective": objective,
        "scheduler": scheduler_config(run.get("schedule") or "squaredcos_cap_v2", objective),
        "class_tokens": {"tokens": ref.TOKENS, "dim": ref.TOKEN_DIM, "null_class": ref.NULL_CLASS},
    }
    (weights / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = (weights / "model.safetensors").stat().st_size
    print(f"wrote {weights / 'model.safetensors'} ({size / 1e6:.1f} MB, iteration {state['step']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(data.DATASETS), default="fashion")
    ap.add_argument("--data", default=None, help="where the dataset's files are (default: see postdiff/data.py)")
    ap.add_argument("--ckpt", default=None, help="checkpoint to resume and write (default: checkpoint.pt, digits/checkpoint.pt)")
    ap.add_argument("--init", default=None, help="start a new run from this checkpoint's weights (ignored when resuming)")
    ap.add_argument("--sizes", default="16,24,32", help="training sizes in px, one drawn per batch")
    ap.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default=None,
        help="noise schedule (default: the checkpoint's when resuming, else scaled_linear, Stable Diffusion's)",
    )
    ap.add_argument(
        "--objective",
        choices=["epsilon", "flow"],
        default=None,
        help="what the network learns: epsilon (noise prediction, the reference models) or flow (rectified flow, the velocity; "
        "reference-flow). Default: the checkpoint's when resuming, else epsilon",
    )
    ap.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 0 at --iters")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this sitting")
    ap.add_argument("--iters", type=int, default=1_000_000, help="stop at this total iteration count")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights and stop")
    args = ap.parse_args(argv)
    if args.ckpt is None:
        key = weights_key(args.dataset, args.objective or "epsilon")
        args.ckpt = str(DEFAULT_CKPT if key == "fashion" else HERE / key / "checkpoint.pt")
    args.init_sha256 = data.sha256(Path(args.init)) if args.init else None
    if args.export:
        export(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
