"""``postdiff env``: what a bug report needs. The versions of PostDiff's packages and of the libraries it runs on,
the CPU's vector extensions, and the devices each runtime can use (as ``diffusers-cli env`` does for diffusers)."""

from __future__ import annotations

import json
import os
import platform
import sys

from ..render import print_table

PACKAGES = ("postdiff-core", "postdiff-lab", "postdiff-onnx", "postdiff-openvino", "postdiff-coreml", "postdiff-cli")
LIBRARIES = ("torch", "diffusers", "transformers", "onnxruntime", "openvino", "coremltools", "numpy", "nncf")
# the x86 and Arm features that decide which kernels ONNX Runtime, OpenVINO and PyTorch pick on a CPU
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
    "bf16",
)


def add_parser(sub) -> None:
    e = sub.add_parser("env", help="versions, CPU features and devices, for a bug report")
    e.add_argument("--json", action="store_true", help="print the facts as JSON instead of a table")


def cpu_features() -> list[str]:
    """The vector extensions of this CPU that the runtimes use, from /proc/cpuinfo (Linux) or sysctl (macOS)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    arm: list[str] = []
    if sys.platform == "darwin":  # Intel Macs: machdep.cpu.*features; Apple silicon: hw.optional.arm.FEAT_* (not run here)
        import subprocess

        out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.startswith(("machdep.cpu.features", "machdep.cpu.leaf7_features")):
                flags |= {f.lower().replace(".", "_") for f in value.split()}
            elif key.startswith("hw.optional.arm.FEAT_") and value.strip() == "1":
                arm.append(key.rsplit(".", 1)[-1].lower())
    return [f for f in VECTOR_FLAGS if f in flags] + sorted(arm)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices(installed: dict[str, str]) -> dict[str, object]:
    """What each installed runtime can run on here; a runtime that is not installed is left out."""
    out: dict[str, object] = {}
    if "torch" in installed:
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        out["torch devices"] = ["cpu", *(f"cuda:{i} ({n})" for i, n in enumerate(cuda)), *(["mps"] if mps else [])]
        out["torch threads"] = torch.get_num_threads()
    if "onnxruntime" in installed:
        import onnxruntime

        out["onnxruntime providers"] = onnxruntime.get_available_providers()
    if "openvino" in installed:
        import openvino

        out["openvino devices"] = openvino.Core().available_devices
    return out


def facts() -> dict[str, object]:
    from postdiff.bundle.manifest import tool_versions  # what bundle manifests record, here for every package

    installed = tool_versions(*PACKAGES, *LIBRARIES)
    return {
        "postdiff": {p: installed.get(p) for p in PACKAGES},
        "libraries": {lib: installed.get(lib) for lib in LIBRARIES},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu features": cpu_features(),
        "devices": devices(installed),
    }


def run(args) -> int:
    found = facts()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    rows = [[name, version or "not installed"] for name, version in {**found["postdiff"], **found["libraries"]}.items()]
    rows += [["python", found["python"]], ["platform", found["platform"]], ["cpu", f"{found['cpu']} ({found['cores']} cores)"]]
    rows += [["cpu features", " ".join(found["cpu features"]) or "none of " + ", ".join(VECTOR_FLAGS[:4])]]
    rows += [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in found["devices"].items()]
    print_table(["what", "here"], rows)
    return 0
