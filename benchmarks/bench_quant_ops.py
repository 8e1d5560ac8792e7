"""Which int8/int4 operators ONNX Runtime and OpenVINO compute fast on this CPU: the measurement behind
``postdiff_onnx.quantize``'s choices.

    python benchmarks/bench_quant_ops.py                  # 640 ch at 16x16, 1280 ch at 8x8 and 4x4, batch 2
    python benchmarks/bench_quant_ops.py --threads 2 --repeats 7

A stack of ``--layers`` residual blocks (SiLU, then a 3x3 convolution of C to C channels, added back), SD1.5's widths
at the latent sizes a 256 px image gives, written in each form a quantized bundle could use, timed in one process
side by side (every form once per round, ``--rounds`` rounds; the median of the fastest ``--repeats`` calls per
round), and compared with the fp32 convolution (PSNR of the output):

- ``ort fp32 conv`` (ORT's own default, pre-packed) and ``ort fp32 conv, no prepack`` (a shared-weights session);
- ``ort ConvInteger``: int8 weights and activations quantized per call, the ONNX operator for it;
- ``ort QLinearConv (QDQ)``: static int8 activations in and out (the scales here are not calibrated: speed only);
- ``ort im2col fp32``: ``quantize.conv_as_matmul`` alone (its cost against the convolution);
- ``ort int8 dynamic``: ``quantize.quantize_int8`` after im2col, pre-packed and not (what int8 bundles run);
- ``ort int4 MatMulNBits``: ``quantize.quantize_int4``, pre-packed and not (what int4 bundles run);
- ``ov fp32``, ``ov int8 twin`` (``quantize.openvino_form``), ``ov int4 MatMulNBits`` on OpenVINO's CPU plugin;
- and a memory probe: a weight through ``DequantizeLinear`` into an fp32 ``Conv`` (ORT), peak RSS of a child process.

Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = ((640, 16), (1280, 8), (1280, 4))  # (channels, latent side) at 256 px


def block_model(channels: int, layers: int, form: str):
    """``layers`` residual blocks of SiLU + 3x3 conv, the conv written as ``form`` ("conv" | "convinteger" | "qdq")."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) / math.sqrt(channels * 9)).astype(np.float32)
        nodes += [helper.make_node("Sigmoid", [prev], [f"s{i}"]), helper.make_node("Mul", [prev, f"s{i}"], [f"a{i}"])]
        scale = np.abs(w).reshape(channels, -1).max(1) / 127
        q = np.round(w / scale[:, None, None, None]).astype(np.int8)
        if form == "conv":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("Conv", [f"a{i}", f"w{i}"], [f"c{i}"], pads=[1] * 4))
        elif form == "convinteger":  # ConvInteger takes one weight zero point; the per-channel scale follows it
            inits += [
                numpy_helper.from_array(q, f"q{i}"),
                numpy_helper.from_array(np.zeros((), np.int8), f"z{i}"),
                numpy_helper.from_array(scale.astype(np.float32).reshape(1, -1, 1, 1), f"ws{i}"),
            ]
            nodes += [
                helper.make_node("DynamicQuantizeLinear", [f"a{i}"], [f"aq{i}", f"as{i}", f"az{i}"]),
                helper.make_node("ConvInteger", [f"aq{i}", f"q{i}", f"az{i}", f"z{i}"], [f"i{i}"], pads=[1] * 4),
                helper.make_node("Cast", [f"i{i}"], [f"f{i}"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"f{i}", f"as{i}"], [f"g{i}"]),
                helper.make_node("Mul", [f"g{i}", f"ws{i}"], [f"c{i}"]),
            ]
        elif form == "qdq":  # QDQ around the convolution, in and out (ORT fuses it into QLinearConv)
            inits += [
                numpy_helper.from_array(q, f"q{i}"),
                numpy_helper.from_array(scale.astype(np.float32), f"ws{i}"),
                numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{i}"),
                numpy_helper.from_array(np.array(6 / 255, np.float32), f"xs{i}"),
                numpy_helper.from_array(np.array(10, np.uint8), f"xz{i}"),
                numpy_helper.from_array(np.array(8 / 255, np.float32), f"ys{i}"),
                numpy_helper.from_array(np.array(128, np.uint8), f"yz{i}"),
            ]
            nodes += [
                helper.make_node("QuantizeLinear", [f"a{i}", f"xs{i}", f"xz{i}"], [f"xq{i}"]),
                helper.make_node("DequantizeLinear", [f"xq{i}", f"xs{i}", f"xz{i}"], [f"xd{i}"]),
                helper.make_node("DequantizeLinear", [f"q{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=0),
                helper.make_node("Conv", [f"xd{i}", f"wd{i}"], [f"cc{i}"], pads=[1] * 4),
                helper.make_node("QuantizeLinear", [f"cc{i}", f"ys{i}", f"yz{i}"], [f"cq{i}"]),
                helper.make_node("DequantizeLinear", [f"cq{i}", f"ys{i}", f"yz{i}"], [f"c{i}"]),
            ]
        nodes.append(helper.make_node("Add", [prev, f"c{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "blocks", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])


def forms(channels: int, layers: int) -> dict:
    """{name: (runtime, model, pre-pack)} for every form measured."""
    from postdiff_onnx import quantize

    conv = block_model(channels, layers, "conv")
    col = copy.deepcopy(conv)
    quantize.conv_as_matmul(col)
    int8 = copy.deepcopy(col)
    quantize.quantize_int8(int8)
    twin = copy.deepcopy(int8)
    quantize.openvino_form(twin)
    int4 = quantize.quantize_int4(copy.deepcopy(col))
    return {
        "ort fp32 conv": ("ort", conv, True),
        "ort fp32 conv, no prepack": ("ort", conv, False),
        "ort ConvInteger": ("ort", block_model(channels, layers, "convinteger"), False),
        "ort QLinearConv (QDQ)": ("ort", block_model(channels, layers, "qdq"), True),
        "ort im2col fp32": ("ort", col, False),
        "ort int8 dynamic, no prepack": ("ort", int8, False),
        "ort int8 dynamic, prepack": ("ort", int8, True),
        "ort int4 MatMulNBits, prepack": ("ort", int4, True),
        "ort int4 MatMulNBits, no prepack": ("ort", int4, False),
        "ov fp32": ("ov", conv, None),
        "ov int8 twin": ("ov", twin, None),
        "ov int4 MatMulNBits": ("ov", int4, None),
    }


def runner(kind: str, model, prepack, threads: int):
    if kind == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 3
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if prepack else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})[0]
    import tempfile

    import onnx
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:  # OpenVINO reads ONNX from a file
        path = Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    return lambda x: np.asarray(compiled({0: x})[0])


def dq_conv_memory(layers: int = 8, channels: int = 1280) -> dict:
    """Peak RSS of a child that runs ``layers`` int8 weights through DequantizeLinear into fp32 Convs (ORT)."""
    code = f"""
import numpy as np, onnxruntime as ort, sys
sys.path.insert(0, {str(HERE)!r})
from bench_quant_ops import dq_conv_model
m = dq_conv_model({layers}, {channels})
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.log_severity_level = 3
s = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
before = rss()
s.run(None, {{"x": np.random.default_rng(0).standard_normal((2, {channels}, 4, 4)).astype(np.float32)}})
print(before, rss())
"""
    before, after = (
        int(v) for v in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    int8_mb = layers * channels * channels * 9 / 2**20
    return {"int8_weights_mb": int8_mb, "rss_before_run_mb": before, "rss_after_run_mb": after, "growth_mb": after - before}


def dq_conv_model(layers: int, channels: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        q = rng.integers(-127, 128, (channels, channels, 3, 3), dtype=np.int8)
        inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(np.full(channels, 1e-3, np.float32), f"s{i}")]
        nodes += [
            helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=0),
            helper.make_node("Conv", [prev, f"w{i}"], [f"h{i}"], pads=[1] * 4),
        ]
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "dq", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])


def main(argv=None) -> int:
    import logging

    logging.disable(logging.INFO)  # ORT's quantizer logs every node
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per form and round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "quant_ops.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "packages" / "postdiff-lab" / "src"))
    from postdiff_lab.report import machine_info

    result = {
        "command": " ".join(["bench_quant_ops.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "threads": args.threads,
        "layers": args.layers,
        "batch": 2,
        "rows": [],
    }
    lines = ["| channels | latent | form | ms (median) | vs fp32 conv | PSNR vs fp32 dB |", "|---|---|---|---|---|---|"]
    for channels, side in SHAPES:
        x = np.random.default_rng(0).standard_normal((2, channels, side, side)).astype(np.float32)
        runners = {
            name: runner(kind, model, prepack, args.threads) for name, (kind, model, prepack) in forms(channels, args.layers).items()
        }
        times: dict[str, list[float]] = {k: [] for k in runners}
        outputs = {}
        for _ in range(args.rounds):
            for name, run in runners.items():
                outputs[name] = run(x)
                calls = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    run(x)
                    calls.append(time.perf_counter() - t)
                times[name] += calls
        base = statistics.median(times["ort fp32 conv"])
        ref = outputs["ort fp32 conv"]
        for name in runners:
            ms = statistics.median(times[name]) * 1e3
            err = float(np.sqrt(np.mean((outputs[name] - ref) ** 2)))
            db = 999.0 if err == 0 else 20 * math.log10(float(np.abs(ref).max()) / err)
            result["rows"].append(
                {
                    "channels": channels,
                    "latent": side,
                    "form": name,
                    "median_ms": ms,
                    "runs_ms": [t * 1e3 for t in times[name]],
                    "vs_fp32_conv": base * 1e3 / ms,
                    "psnr_vs_fp32_db": db,
                }
            )
            lines.append(f"| {channels} | {side}x{side} | {name} | {ms:.1f} | {base * 1e3 / ms:.2f}x | {db:.1f} |")
        print("\n".join(lines[-len(runners) :]), flush=True)
    result["dequantize_into_conv_memory"] = dq_conv_memory()
    m = result["dequantize_into_conv_memory"]
    text = "\n".join(lines) + (
        f"\n\nDequantizeLinear -> fp32 Conv on ONNX Runtime ({m['int8_weights_mb']:.0f} MB of int8 weights): RSS grew by "
        f"{m['growth_mb']} MB on the first call (the dequantized fp32 weights, held)"
    )
    print(text)
    from postdiff_lab.report import write_results

    print(f"wrote {write_results(args.out, result, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
