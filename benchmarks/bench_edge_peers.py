"""Edge peers side by side: stable-diffusion.cpp against PostDiff's bundles (ONNX Runtime fp32/int8/int4, OpenVINO
fp32/int8) and PyTorch, on one random-weight SD1.5, whole generations (text encoder + denoising + VAE decode).

Setup, once (benchmark only, never CI: stable-diffusion.cpp ships inside the ``cyllama`` wheel, built for AVX2):

    python3 -m venv benchmarks/.peers && benchmarks/.peers/bin/pip install cyllama==0.2.18

Run (from the repository root, in the project's venv):

    .venv/bin/python benchmarks/bench_edge_peers.py                       # 256 px, every row, N = 3
    .venv/bin/python benchmarks/bench_edge_peers.py --size 512 --rows sdcpp-q8_0,onnx-int8-postdiff --runs 3

The model: the ``arch:sd15`` UNet (seed 0), SD1.5's VAE and CLIP ViT-L/14 text encoder built from their published
configs with random weights (seeds 1 and 2), a byte-level CLIP tokenizer (no vocabulary files can be fetched
offline), DDIM on SD's noise schedule. Written once as a diffusers folder (``benchmarks/.models/sd15-random``) that
PostDiff exports from, and as one safetensors file with the diffusers tensor names under ``unet.``, ``vae.`` and
``te.text_model.`` that stable-diffusion.cpp reads (``sd15-random.safetensors``). Random weights: timings and
memory mean what they say; images do not.

Every row runs in a fresh process, wrapped in ``/usr/bin/time -v`` (peak RSS: its "Maximum resident set size",
the process's VmHWM); rows run interleaved in rounds (round 1 of every row, then round 2, ...) so drift on this
noisy machine falls on every row alike, and the load average is recorded before each run. Reported per row: the
median over the runs of the whole generation (what a user waits for after the model is loaded: for PostDiff's
``--low-memory`` runs that includes opening each graph when the plan first needs it), its parts (text encoder,
denoising, VAE; sd.cpp from its own log), the peak RSS, the weights' bytes on disk and the model's load time.
stable-diffusion.cpp samples with ``euler`` (its default; it has no DDIM), PostDiff with DDIM: both call the UNet
20 times with CFG, the cost the table compares. Prints a Markdown table; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE / ".models"
BUNDLES = HERE / ".bundles"
PEERS = HERE / ".peers" / "bin" / "python"
PROMPT = "a photograph of an astronaut riding a horse"
STEPS, CFG, SEED = 20, 7.5, 0

# row name -> (engine, weights, plan); sd.cpp's weight rows are its own tensor-type rules
ROWS = {
    "sdcpp-default": ("sdcpp", "linear f32, conv f16", "baseline"),
    "sdcpp-f16": ("sdcpp", "UNet f16", "baseline"),
    "sdcpp-q8_0": ("sdcpp", "UNet q8_0", "baseline"),
    "onnx-fp32-baseline": ("onnx", "fp32", "baseline"),
    "onnx-fp32-postdiff": ("onnx", "fp32", "postdiff"),
    "onnx-int8-baseline": ("onnx", "int8", "baseline"),
    "onnx-int8-postdiff": ("onnx", "int8", "postdiff"),
    "onnx-int4-postdiff": ("onnx", "int4", "postdiff"),
    "openvino-fp32-postdiff": ("openvino", "fp32", "postdiff"),
    "openvino-int8-postdiff": ("openvino", "int8", "postdiff"),
    "torch-fp32-postdiff": ("torch", "fp32", "postdiff"),
}
SDCPP_RULES = {"sdcpp-f16": r"^model\.diffusion_model\.=f16", "sdcpp-q8_0": r"^model\.diffusion_model\.=q8_0"}


# -- the model ------------------------------------------------------------------------------------------------------------
def build_model(folder: Path = MODELS / "sd15-random") -> tuple[Path, Path]:
    """The random-weight SD1.5 as a diffusers folder and as sd.cpp's one safetensors file (built once)."""
    single = folder.with_suffix(".safetensors")
    if (folder / "model_index.json").is_file() and single.is_file():
        return folder, single
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from postdiff_lab.architectures import SD15
    from postdiff_lab.toy import _byte_vocab, build_unet, toy_tokenizer

    print(f"building the random-weight SD1.5 in {folder}", file=sys.stderr)
    unet = build_unet(SD15, seed=0)
    torch.manual_seed(1)
    vae = AutoencoderKL(  # SD1.5's vae/config.json
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    torch.manual_seed(2)
    vocab = len(_byte_vocab())
    text = CLIPTextModel(  # CLIP ViT-L/14's text tower (SD1.5's text_encoder/config.json)
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=toy_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD15.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors |= {f"vae.{k}": v for k, v in vae.state_dict().items()}
    # sd.cpp reads CLIP under te.text_model. (transformers 5's CLIPTextModel names its weights without text_model.)
    tensors |= {f"te.text_model.{k.removeprefix('text_model.')}": v for k, v in text.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(single))
    return folder, single


def bundle_for(model: Path, weights: str, plan: str, size: int) -> Path:
    """The ONNX bundle of ``plan`` at ``size`` px with ``weights``, exported once (cached by name)."""
    from postdiff.bundle.export import export_bundle

    folder = BUNDLES / f"edge-sd15-{plan}-{weights}-{size}"
    if not (folder / "manifest.json").is_file():
        print(f"exporting {folder.name}", file=sys.stderr)
        export_bundle(
            "onnx",
            str(model),
            plan,
            folder,
            height=size,
            width=size,
            overwrite=folder.exists(),
            weights=weights,
            log=lambda m: print(f"  {m}", file=sys.stderr),
        )
    return folder


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- one run, in a child process ------------------------------------------------------------------------------------------
class PhaseTimer:
    """A GraphRunner proxy that adds up the seconds spent per phase (encoders, UNet, VAE), graph opening included."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, graph, feeds):
        start = time.perf_counter()
        try:
            return self.inner.run(graph, feeds)
        finally:
            key = {"unet": "denoising_s", "vae_decoder": "vae_s"}.get(graph.role, "text_s")
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def child_bundle(engine: str, bundle: str, threads: int, low_memory: bool) -> dict:
    from postdiff.bundle.runtime import load_bundle

    options = {"threads": threads}
    start = time.perf_counter()
    pipe = load_bundle(bundle, engine, low_memory=low_memory, **options)
    plan = pipe.compile()
    pipe.open(plan)  # nothing under --low-memory: graphs open when the plan first needs them
    load_s = time.perf_counter() - start
    pipe.runner.inner = timer = PhaseTimer(pipe.runner.inner)
    start = time.perf_counter()
    image = pipe.generate([PROMPT], plan, seed=SEED, guidance_scale=CFG)[0]
    seconds = time.perf_counter() - start
    return {
        "load_s": load_s,
        "generation_s": seconds,
        **timer.seconds,
        "weights": pipe.manifest.weights,
        "finite": bool((image == image).all()),
    }


def child_torch(model: str, plan: str, size: int, threads: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    import postdiff

    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model)
    postdiff.apply(pipe, plan)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(
            PROMPT, height=size, width=size, num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED)
        )
    seconds = time.perf_counter() - start
    return {"load_s": load_s, "generation_s": seconds, "weights": "fp32", "finite": image.images[0] is not None}


def sdcpp_command(row: str, single: Path, size: int, threads: int, output: Path) -> list[str]:
    cmd = [str(PEERS), "-m", "cyllama.sd", "txt2img", "--model", str(single), "-p", PROMPT, "-W", str(size), "-H", str(size)]
    cmd += ["--steps", str(STEPS), "--cfg-scale", str(CFG), "--sampler", "euler", "--threads", str(threads), "--seed", str(SEED)]
    cmd += ["--output", str(output), "--verbose"]
    if row in SDCPP_RULES:
        cmd += ["--tensor-type-rules", SDCPP_RULES[row]]
    return cmd


def parse_sdcpp(log: str) -> dict:
    """Times from stable-diffusion.cpp's verbose log (its own phase timers)."""

    def grab(pattern: str, scale: float = 1.0):
        m = re.findall(pattern, log)
        return float(m[-1]) * scale if m else None

    return {
        "load_s": grab(r"loading tensors completed, taking ([\d.]+)s"),
        "text_s": grab(r"get_learned_condition completed, taking ([\d.]+)s"),
        "denoising_s": grab(r"sampling completed, taking ([\d.]+)s"),
        "vae_s": grab(r"decode_first_stage completed, taking ([\d.]+)s"),
        "generation_s": grab(r"generate_image completed in ([\d.]+)s"),
    }


def max_rss_mb(time_log: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log)
    return int(m.group(1)) / 1024 if m else None


def run_row(row: str, args, model: Path, single: Path, bundles: dict) -> dict:
    engine, weights, plan = ROWS[row]
    load = os.getloadavg()[0]
    out_png = BUNDLES / f"{row}-{args.size}.png"
    if engine == "sdcpp":
        cmd = sdcpp_command(row, single, args.size, args.threads, out_png)
    else:
        what = str(bundles[row]) if engine in ("onnx", "openvino") else str(model)
        cmd = [sys.executable, __file__, "--child", engine, what, plan, str(args.size), str(args.threads), "1" if args.low_memory else "0"]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{row} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    if engine == "sdcpp":
        result = parse_sdcpp(proc.stdout + proc.stderr)
    else:
        result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return {**result, "peak_rss_mb": max_rss_mb(proc.stderr), "process_s": wall, "load_average_1min": load}


# -- the table ------------------------------------------------------------------------------------------------------------
def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(result: dict) -> str:
    def f(x, digits=1):
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        "| engine | plan | weights | generation s | text s | denoising s | VAE s | peak RSS GB | weights on disk MB | load s | N |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in result["rows"].items():
        engine, weights, plan = ROWS[row]
        m = r["medians"]
        rss = m["peak_rss_mb"]
        lines.append(
            f"| {engine} | {plan} | {weights} | {f(m['generation_s'])} | {f(m.get('text_s'), 2)} | {f(m.get('denoising_s'))} | "
            f"{f(m.get('vae_s'), 2)} | {f(rss and rss * 2**20 / 1e9, 2)} | {r['bytes'] / 1e6:,.0f} | {f(m.get('load_s'))} | {len(r['runs'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image side in px (default: 256)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: all: {', '.join(ROWS)})")
    ap.add_argument("--runs", type=int, default=3, help="runs per row, interleaved in rounds (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("--no-low-memory", dest="low_memory", action="store_false", help="PostDiff bundles without --low-memory")
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/edge_peers_<size>.json)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        engine, what, plan, size, threads, low = args.child
        if engine == "torch":
            out = child_torch(what, plan, int(size), int(threads))
        else:
            out = child_bundle(engine, what, int(threads), low == "1")
        print(json.dumps(out))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    if any(ROWS[r][0] == "sdcpp" for r in rows) and not PEERS.is_file():
        raise SystemExit(
            f"stable-diffusion.cpp rows need {PEERS}: python3 -m venv benchmarks/.peers && benchmarks/.peers/bin/pip install cyllama==0.2.18"
        )
    model, single = build_model()
    bundles = {r: bundle_for(model, ROWS[r][1], ROWS[r][2], args.size) for r in rows if ROWS[r][0] in ("onnx", "openvino")}
    from postdiff_lab.report import machine_info

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "model": "random-weight SD1.5 (arch:sd15 UNet seed 0, SD1.5 VAE seed 1, CLIP ViT-L/14 text encoder seed 2)",
        "size": args.size,
        "steps": STEPS,
        "cfg": CFG,
        "threads": args.threads,
        "low_memory": args.low_memory,
        "rows": {},
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    runs: dict[str, list] = {r: [] for r in rows}
    for k in range(args.runs):
        for row in rows:
            runs[row].append(run_row(row, args, model, single, bundles))
            r = runs[row][-1]
            print(
                f"round {k + 1}/{args.runs} {row}: generation {r.get('generation_s') or 0:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                f"load average {r['load_average_1min']:.1f}",
                file=sys.stderr,
            )
    for row in rows:
        keys = ("generation_s", "text_s", "denoising_s", "vae_s", "peak_rss_mb", "load_s", "process_s")
        weights_path = single if ROWS[row][0] in ("sdcpp", "torch") else bundles[row]
        result["rows"][row] = {"runs": runs[row], "medians": {k: median(runs[row], k) for k in keys}, "bytes": tree_bytes(weights_path)}
    text = table(result)
    print(text)
    from postdiff_lab.report import write_results

    out = write_results(args.out or HERE / "results" / f"edge_peers_{args.size}.json", result, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
