"""Why ONNX Runtime's low-resolution UNet calls do fewer MACs per second on this CPU: the weights they stream.

    python benchmarks/bench_onnx_weight_traffic.py                       # synthetic parts + the arch:sd15 256 px bundle
    python benchmarks/bench_onnx_weight_traffic.py --bundle none         # synthetic parts only

A UNet call reads every weight it uses once per call (SD1.5: 3.3 GB in fp32), whatever the latent size, while its
MACs shrink with the latent: a 16x16 call does a quarter of a 32x32 call's MACs but moves the same bytes. Three
parts, each timed on ORT's CPU provider with the runtime's session settings (2 threads, no spinning, the shared
sessions' ORT_ENABLE_EXTENDED without pre-packing unless a row says "prepack"):

1. ``conv``: a chain of eight 1280-channel 3x3 convolutions (472 MB of weights, far more than the caches) at the
   UNet's deepest spatial sizes, batch 1, 2 and 4: time and weight bytes per second. If a batch-2 call costs twice a
   batch-1 call at 2x2, ORT's convolution streams the weights once per image of the batch (the CFG batch doubles the
   traffic). ``fold`` rows run the same convolutions with the batch folded into the rows of one image (zero rows
   between the images keep the sum exact), which streams them once: whether that pays for its copies.
2. ``matmul``: a 1280x10240 linear layer (50 MB) on 2 x T tokens, with and without ORT's weight pre-packing: the
   cost of packing the weight on every call, which the shared sessions pay (pre-packing gives each session a copy).
3. ``profile`` (with a bundle): ORT's profiler on the bundle's ``unet_full`` graph at the plan's low and full latent
   sizes (batch 2), time per operator type, and for each the part that does not shrink with the latent,
   ``c = (r t_low - t_full) / (r - 1)`` for the area ratio r of the two sizes (a fit of t = c + area / rate: the
   MACs of convolutions and linear layers grow with the area; attention's grow faster, so its c comes out negative).

Prints Markdown tables and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = HERE / ".bundles" / "arch-sd15-postdiff-256"  # what bench_onnx_cpu.py --size 256 exports


def session(model_bytes_or_path, *, prepack: bool = False, threads: int = 2, initializers=None, profile: str | None = None):
    """The runtime's shared-session settings (``postdiff_onnx.session.make_session`` with ``prepack=False``), built
    here rather than called because this benchmark needs what the runtime never does: in-memory models, ORT's
    profiler, and pre-packing without the NCHWc layout (``make_session``'s ``prepack`` brings both), so that the
    ``prepack`` rows measure the packing alone."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if not prepack:
        o.add_session_config_entry("session.disable_prepacking", "1")
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, value in (initializers or {}).items():
        o.add_initializer(name, value)
    if profile:
        o.enable_profiling, o.profile_file_prefix = True, profile
    return ort.InferenceSession(model_bytes_or_path, sess_options=o, providers=["CPUExecutionProvider"])


def best_of(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def conv_chain(channels: int, n: int, fold: bool, rng) -> bytes:
    """n chained 3x3 convolutions (pad 1) on [b, C, h, w]; ``fold``: each one on the batch stacked into the rows of
    one image with a zero row after each image: Concat(x, 0) -> Transpose -> Reshape [1, C, b(h+1), w] -> Conv ->
    Reshape -> Transpose -> Slice (exact: the zero row is the padding the image would have had)."""
    from onnx import TensorProto, helper, numpy_helper

    h = helper
    nodes, inits, cur = [], [], "x"
    if fold:
        shape_nodes = [
            h.make_node("Shape", ["x"], ["shp"]),
            h.make_node("Gather", ["shp", "i0"], ["b"], axis=0),
            h.make_node("Gather", ["shp", "i2"], ["hh"], axis=0),
            h.make_node("Gather", ["shp", "i3"], ["ww"], axis=0),
            h.make_node("Add", ["hh", "one"], ["h1"]),
            h.make_node("Mul", ["b", "h1"], ["bh1"]),
            h.make_node("Concat", ["one", "c", "bh1", "ww"], ["flat"], axis=0),
            h.make_node("Concat", ["c", "b", "h1", "ww"], ["unflat"], axis=0),
            h.make_node("Concat", ["b", "c", "one", "ww"], ["zshape"], axis=0),
            h.make_node("ConstantOfShape", ["zshape"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        ]
        nodes += shape_nodes
        for name, v in (("i0", [0]), ("i2", [2]), ("i3", [3]), ("one", [1]), ("c", [channels]), ("zero", [0])):
            inits.append(numpy_helper.from_array(np.array(v, np.int64), name))
    for i in range(n):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.01, w))
        out = "y" if i == n - 1 else f"y{i}"
        if not fold:
            nodes.append(h.make_node("Conv", [cur, w], [out], pads=[1, 1, 1, 1]))
        else:
            nodes += [
                h.make_node("Concat", [cur, "zeros"], [f"p{i}"], axis=2),
                h.make_node("Transpose", [f"p{i}"], [f"t{i}"], perm=[1, 0, 2, 3]),
                h.make_node("Reshape", [f"t{i}", "flat"], [f"f{i}"]),
                h.make_node("Conv", [f"f{i}", w], [f"c{i}"], pads=[1, 1, 1, 1]),
                h.make_node("Reshape", [f"c{i}", "unflat"], [f"u{i}"]),
                h.make_node("Transpose", [f"u{i}"], [f"v{i}"], perm=[1, 0, 2, 3]),
                h.make_node("Slice", [f"v{i}", "zero", "hh", "i2"], [out]),
            ]
        cur = out
    graph = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["b", channels, "h", "w"])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]).SerializeToString()


def part_conv(runs: int, threads: int) -> list[dict]:
    rng = np.random.default_rng(0)
    channels, n = 1280, 8
    weight_mb = channels * channels * 9 * 4 * n / 1e6
    plain, folded = (session(conv_chain(channels, n, f, np.random.default_rng(0)), threads=threads) for f in (False, True))
    rows = []
    for hw in (2, 4, 8):
        for b in (1, 2, 4):
            x = rng.standard_normal((b, channels, hw, hw), dtype=np.float32)
            t = best_of(lambda x=x: plain.run(None, {"x": x}), runs)
            row = {
                "part": "conv",
                "size": f"{hw}x{hw}",
                "batch": b,
                "weights_mb": round(weight_mb, 1),
                "s": t,
                "weight_gb_per_s": weight_mb / 1e3 / t,
            }
            if b > 1:
                y0, y1 = plain.run(None, {"x": x})[0], folded.run(None, {"x": x})[0]
                row["fold_s"] = best_of(lambda x=x: folded.run(None, {"x": x}), runs)
                row["fold_max_rel_diff"] = float(np.abs(y0 - y1).max() / np.abs(y0).max())
            rows.append(row)
            print(
                f"conv {hw}x{hw} b{b}: {t * 1e3:.1f} ms ({row['weight_gb_per_s']:.1f} GB/s of weights)"
                + (f", folded {row['fold_s'] * 1e3:.1f} ms" if "fold_s" in row else ""),
                flush=True,
            )
    return rows


def part_matmul(runs: int, threads: int) -> list[dict]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 1280, 10240
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.01, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    sessions = {"shared": session(model, threads=threads), "prepack": session(model, prepack=True, threads=threads)}
    rows = []
    for tokens in (4, 16, 64, 256):
        x = rng.standard_normal((2, tokens, k), dtype=np.float32)
        row = {"part": "matmul", "tokens": tokens, "batch": 2, "weights_mb": k * n * 4 / 1e6}
        for name, s in sessions.items():
            row[f"{name}_s"] = best_of(lambda s=s, x=x: s.run(None, {"x": x}), runs * 4)
        rows.append(row)
        print(f"matmul 2x{tokens} tokens x {k}x{n}: {row['shared_s'] * 1e3:.2f} ms, prepacked {row['prepack_s'] * 1e3:.2f} ms", flush=True)
    return rows


def part_profile(bundle: Path, runs: int, threads: int) -> dict:
    """Per-operator time of ``unet_full`` at the plan's low and full latent size (batch 2), the runtime's sessions."""
    from postdiff.bundle.manifest import read_manifest
    from postdiff_onnx.weights import SharedInitializers

    folder, manifest = read_manifest(bundle, "onnx")
    sizes = sorted(tuple(hw) for hw in manifest.latent_sizes)
    low, full = sizes[0], sizes[-1]
    graph = manifest.unet_graph("full", full)
    shared = SharedInitializers(folder)
    rng = np.random.default_rng(0)
    out = {"bundle": str(bundle), "graph": graph.file, "sizes": [list(low), list(full)], "ops": {}, "run_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for hw in (low, full):
            s = session(str(folder / graph.file), threads=threads, initializers=shared.for_graph(folder / graph.file), profile=f"{tmp}/p")
            feeds = {
                "sample": rng.standard_normal((2, manifest.model["in_channels"], *hw), dtype=np.float32),
                "timestep": np.full((2,), 500.0, np.float32),
                "encoder_hidden_states": rng.standard_normal((2, manifest.model["text_len"], graph.inputs[2].shape[2]), dtype=np.float32),
            }
            s.run(None, feeds)  # warm-up (in the profile; dropped below)
            for _ in range(runs):
                s.run(None, feeds)
            events = json.loads(Path(s.end_profiling()).read_text())
            model_runs = [e for e in events if e.get("name") == "model_run"][1:]
            first = model_runs[0]["ts"]
            per_op = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
                    per_op[e["args"]["op_name"]] += e["dur"] / 1e6 / len(model_runs)
            key = f"{hw[0]}x{hw[1]}"
            out["run_s"][key] = statistics.median(e["dur"] / 1e6 for e in model_runs)
            for op, t in per_op.items():
                out["ops"].setdefault(op, {})[key] = t
            print(f"profile {graph.file} {key} b2: {out['run_s'][key]:.3f} s a call", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="an ONNX bundle to profile ('none': skip that part)")
    ap.add_argument("--runs", type=int, default=5, help="timed calls per case (the fastest counts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "onnx_weight_traffic.json"))
    args = ap.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        ap.error("--runs and --threads must be at least 1")
    bundle = None if args.bundle == "none" else Path(args.bundle)
    if bundle is not None and not (bundle / "manifest.json").is_file():
        ap.error(f"--bundle {bundle}: no ONNX bundle there; export it with benchmarks/bench_onnx_cpu.py --size 256, or pass --bundle none")
    from postdiff_lab.report import machine_info, write_json

    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]), "machine": machine_info()}
    result["threads"] = args.threads
    result["conv"] = part_conv(args.runs, args.threads)
    result["matmul"] = part_matmul(args.runs, args.threads)
    if bundle is not None:
        result["profile"] = part_profile(bundle, args.runs, args.threads)
    write_json(Path(args.out), result)

    print(f"\nONNX Runtime CPU, {result['machine']['cpu']}, {args.threads} threads, fastest of {args.runs} calls")
    print("\n| eight 1280-ch 3x3 convs (472 MB) | batch | ms | GB/s of weights | x batch 1 | batch folded into rows, ms |")
    print("|---|---|---|---|---|---|")
    one = {r["size"]: r["s"] for r in result["conv"] if r["batch"] == 1}
    for r in result["conv"]:
        fold = f"{r['fold_s'] * 1e3:.1f}" if "fold_s" in r else "-"
        print(f"| {r['size']} | {r['batch']} | {r['s'] * 1e3:.1f} | {r['weight_gb_per_s']:.1f} | {r['s'] / one[r['size']]:.2f} | {fold} |")
    print("\n| 1280x10240 linear (50 MB), 2 x tokens | shared weights, ms | pre-packed, ms | packing share |")
    print("|---|---|---|---|")
    for r in result["matmul"]:
        print(f"| {r['tokens']} | {r['shared_s'] * 1e3:.2f} | {r['prepack_s'] * 1e3:.2f} | {1 - r['prepack_s'] / r['shared_s']:.0%} |")
    if "profile" in result:
        p = result["profile"]
        low, full = (f"{h}x{w}" for h, w in p["sizes"])
        (lh, lw), (fh, fw) = p["sizes"]
        r = fh * fw / (lh * lw)  # the MACs of convolutions and linear layers scale with the latent's area
        print(
            f"\n{p['graph']} batch 2 ({p['bundle']}): {p['run_s'][low]:.3f} s at {low}, {p['run_s'][full]:.3f} s at {full} (area ratio {r:.0f})"
        )
        print(f"| operator | {low} ms | {full} ms | ratio | part that does not shrink with the area, ms (Attention grows faster) |")
        print("|---|---|---|---|---|")
        for op, t in sorted(p["ops"].items(), key=lambda kv: -kv[1].get(full, 0))[:8]:
            a, b = t.get(low, 0.0), t.get(full, 0.0)
            c = (r * a - b) / (r - 1)
            print(f"| {op} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a if a else float('nan'):.2f} | {c * 1e3:.0f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
