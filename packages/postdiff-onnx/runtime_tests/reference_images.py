"""Run in the main venv (PyTorch installed) by ``nox -s runtime``: the images of a bundle from its PyTorch-backed
loop (diffusers' schedulers on tensors), which the runtime without PyTorch must reproduce.

    python reference_images.py BUNDLE OUT.npz
"""

import sys

import numpy as np

from postdiff_onnx.runtime import load_bundle

CONDITIONS, SEED = [3, 9], 11

if __name__ == "__main__":
    bundle, out = sys.argv[1], sys.argv[2]
    pipe = load_bundle(bundle)
    images = pipe.generate(CONDITIONS, seed=SEED, loop="torch")
    np.savez(out, images=images, latents=pipe.final_latents, conditions=np.asarray(CONDITIONS), seed=SEED)
    print(f"reference_images: {len(CONDITIONS)} images of {bundle} (torch loop) -> {out}")
