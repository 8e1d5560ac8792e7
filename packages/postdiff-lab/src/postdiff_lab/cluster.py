"""Quality measurements as independent cells, run here or on a cluster (``--executor local|dask|ray``).

A cell is a pure function of (model, its content hash, recipe, scheduler, size, guidance, seed shard, metric): it
generates samples ``first`` .. ``first + count - 1`` of the seed (exactly the images a whole request would hold
there, see ``Source.generate``) and returns per-sample results: classifier features for FID and KID (the
driver computes those from the gathered features: a Fréchet distance is not a mean over shards) or, for LPIPS,
each sample's distance to the baseline image of the same seed (a paired metric: each cell makes its own
baseline shard). Cells are keyed by their content (``Cell.key``): a repeated cell is computed once per run, and
a cluster that sees the same key again (a retry, a resubmission) reuses its result.

Each worker process keeps one loaded model (``_WORKER``), loaded from the model's spec (a named model or a folder
every worker can read) and checked against the driver's content hash, so a worker with other weights fails
loudly instead of mixing results. Timings (``postdiff bench``) are not cells: they stay on one machine, where
the numbers compared are measured side by side.

``postdiff eval`` on a cluster gathers the samples themselves (``"images"`` cells) and measures them here, without
timings. The local executor runs the same cells in this process, in order; a sweep gives the same numbers whichever
executor ran it (``tests/test_cluster.py`` checks this against a real Dask cluster on loopback).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from postdiff.errors import PostDiffError

EXECUTORS = ("local", "dask", "ray")
DEFAULT_SHARD = 100  # samples per cell: the class sampler's batch, so a shard runs the same batches as a whole request


@dataclass(frozen=True)
class Cell:
    model: str  # the spec every worker loads (a named model or a folder they can read)
    model_hash: str  # content hash of the driver's model (``model_fingerprint``)
    recipe: str  # recipe JSON
    scheduler: str | None
    height: int | None
    width: int | None
    guidance: float
    seed: int
    first: int
    count: int
    metric: str  # "features" (FID, KID), "lpips", or "images" (the samples themselves: postdiff eval)
    baseline_steps: int = 20  # the baseline LPIPS pairs with
    # torch threads the cell computes with: float reductions split by thread, so results are bit-identical across
    # executors (and machines of one CPU kind) at one thread count
    threads: int = 1
    prompts: tuple[str, ...] | None = None  # the user's prompts of this cell's samples (``--prompts``), in order
    device: str = "cpu"  # the driver model's PyTorch device and dtype (``Model.to``): workers move theirs to the same
    dtype: str = "float32"

    @property
    def key(self) -> str:
        return "postdiff-cell-" + hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def model_fingerprint(model) -> str:
    """A hash of what a model computes: its configurations and every weight of its pipeline's modules."""
    import torch

    # diffusers' bookkeeping keys (``_use_default_values`` is a list in set order, which differs from process to
    # process; ``_name_or_path``, ``_diffusers_version``) say nothing about what the model computes
    configs = [
        {k: v for k, v in dict(c).items() if not k.startswith("_") or k == "_class_name"}
        for c in (model.unet_config, model.scheduler_config)
    ]
    h = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode())
    pipe = model.pipeline
    parts = dict(getattr(pipe, "components", None) or vars(pipe)) if pipe is not None else {}
    for name in sorted(parts):
        module = parts[name]
        if isinstance(module, torch.nn.Module):
            for key, tensor in module.state_dict().items():
                h.update(f"{name}.{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def cells_for(
    source,
    recipe,
    n: int,
    seed: int,
    metric: str,
    *,
    model_hash: str,
    shard: int = DEFAULT_SHARD,
    baseline_steps: int = 20,
    threads: int = 1,
) -> list[Cell]:
    """The cells that measure ``n`` samples of ``seed`` under ``recipe``, ``shard`` samples each."""
    if shard < 1:
        raise PostDiffError(f"--shard must be at least 1 sample, got {shard}")
    if threads < 1:
        raise PostDiffError(f"--cell-threads must be at least 1, got {threads}")
    # CLIP score is computed where the prompts and the CLIP model are (the driver), from the cells' images
    kind = {"lpips": "lpips", "images": "images", "clip": "images"}.get(metric, "features")
    common = dict(
        model=source.model.name,
        model_hash=model_hash,
        recipe=recipe.to_json(indent=None),
        scheduler=source.scheduler_name,
        height=source.height,
        width=source.width,
        guidance=float(source.guidance),
        seed=int(seed),
        metric=kind,
        baseline_steps=int(baseline_steps),
        threads=int(threads),
        device=source.model.device,
        dtype=source.model.dtype,
    )
    cells = []
    for f in range(0, n, shard):
        count = min(shard, n - f)
        prompts = tuple(source.conditions_of(count, f)) if source.prompts else None
        cells.append(Cell(first=f, count=count, prompts=prompts, **common))
    return cells


def cell_threads(threads: int | None) -> int:
    """The torch threads cells compute with: the count given, or this process's."""
    if threads is None:
        import torch

        return torch.get_num_threads()
    return int(threads)


def run_requests(
    executor,
    source,
    requests,
    metric: str,
    *,
    model_hash: str,
    shard: int | None = None,
    threads: int | None = None,
    baseline_steps: int = 20,
) -> list[list[dict[str, Any]]]:
    """Each (recipe, n, seed) request's cell results, in shard order; every request's cells go to ``executor`` at once."""
    cells = [
        cells_for(
            source,
            recipe,
            n,
            seed,
            metric,
            model_hash=model_hash,
            shard=DEFAULT_SHARD if shard is None else int(shard),
            baseline_steps=baseline_steps,
            threads=cell_threads(threads),
        )
        for recipe, n, seed in requests
    ]
    results = executor.run([c for cs in cells for c in cs], source)
    out, at = [], 0
    for cs in cells:
        out.append(results[at : at + len(cs)])
        at += len(cs)
    return out


# -- the worker side ----------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {"spec": None, "hash": None, "model": None, "baselines": {}}
_LOCK = threading.Lock()  # one cell at a time per process: a loaded model is not shared between threads


def _worker_source(cell: Cell, local_source=None):
    from postdiff.families.model import load_model

    from .generation import source_for

    if local_source is not None:  # the local executor: the driver's own model, already loaded
        return local_source
    where = (cell.model, cell.device, cell.dtype)
    if _WORKER["spec"] != where:
        model = load_model(cell.model, need_pipeline=True).to(cell.device, cell.dtype)
        _WORKER.update(spec=where, hash=model_fingerprint(model), model=model, baselines={})
    if _WORKER["hash"] != cell.model_hash:
        raise PostDiffError(
            f"this worker's {cell.model!r} is not the driver's (content hash {_WORKER['hash']} vs {cell.model_hash}); "
            "give every worker the same model files"
        )
    model = _WORKER["model"]
    return source_for(model, scheduler=cell.scheduler, guidance=cell.guidance, height=cell.height, width=cell.width)


def run_cell(cell: Cell, local_source=None, baselines: dict | None = None) -> dict[str, Any]:
    """Generate the cell's samples and measure them: {"key", "features"} or {"key", "lpips"} (one value per sample),
    or return them: {"key", "images"}."""
    with _LOCK, _torch_threads(cell.threads):
        return _measure(cell, local_source, baselines)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure(cell: Cell, local_source, baselines) -> dict[str, Any]:
    from postdiff.plan.recipe import Recipe

    source = _worker_source(cell, local_source)
    recipe = Recipe.from_json(cell.recipe, where="cell recipe")
    conditions = list(cell.prompts) if cell.prompts else None
    batch = source.generate(recipe, cell.count, cell.seed, first=cell.first, conditions=conditions)
    images = batch.images
    if cell.metric == "images":
        return {"key": cell.key, "images": np.asarray(images)}
    if cell.metric == "features":
        if source.model.dataset is None:  # a text-to-image model measured against --reference-images
            from .text_image import inception_features

            return {"key": cell.key, "features": inception_features(images)}
        from .reference.classifier import classify_samples

        predicted, _, features = classify_samples(images, source.model.dataset)
        # whether each sample is classified as the class it was asked for: the class accuracy beside the FID
        hits = np.asarray(predicted) == np.asarray(batch.conditions)
        return {"key": cell.key, "features": np.asarray(features), "hits": hits}
    from .metrics import lpips_distance

    base_key = (
        cell.model_hash,
        cell.prompts,
        cell.scheduler,
        cell.height,
        cell.width,
        cell.guidance,
        cell.seed,
        cell.first,
        cell.count,
        cell.baseline_steps,
        cell.threads,
    )
    baselines = _WORKER["baselines"] if baselines is None else baselines
    if base_key not in baselines:
        baselines[base_key] = source.generate(
            Recipe(name="baseline", steps=cell.baseline_steps), cell.count, cell.seed, first=cell.first, conditions=conditions
        ).images
    base = baselines[base_key]
    small = images.shape[1] < 64
    return {
        "key": cell.key,
        "lpips": np.asarray(lpips_distance(images, base, resize_to=64 if small else None), dtype=np.float64).reshape(-1),
    }


# -- executors ----------------------------------------------------------------------------------------------------
class Executor:
    """Runs cells; ``run`` returns their results in the order given. Results are kept by key for the executor's
    life: a cell asked for again is not recomputed."""

    name = "local"

    def __init__(self) -> None:
        self._done: dict[str, dict[str, Any]] = {}
        self._baselines: dict[tuple, np.ndarray] = {}  # the local executor's baseline shards (LPIPS)

    def run(self, cells: Sequence[Cell], source=None) -> list[dict[str, Any]]:
        todo = list({c.key: c for c in cells if c.key not in self._done}.values())
        if todo:
            for c, result in zip(todo, self._compute(todo, source)):
                if result.get("key") != c.key:  # a result must come back for the cell it was asked for
                    raise PostDiffError(f"{self.name} executor returned a result for another cell than {c.key}")
                self._done[c.key] = result
        return [self._done[c.key] for c in cells]

    def _compute(self, cells: list[Cell], source) -> list[dict[str, Any]]:
        return [run_cell(c, source, self._baselines) for c in cells]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DaskExecutor(Executor):
    """Cells as Dask tasks keyed by content. ``address``: an existing scheduler (``tcp://host:8786``); none starts a
    ``LocalCluster`` on this machine: one worker process per ``threads`` cores (the torch threads of a cell)."""

    name = "dask"

    def __init__(self, address: str | None = None, *, threads: int = 1) -> None:
        super().__init__()
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise PostDiffError("--executor dask needs dask.distributed: pip install 'dask[distributed]==2026.8.0'") from None
        self._cluster = None
        if address:
            import dask

            # Dask's own connect timeout (30 s unless set, e.g. DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s)
            timeout = dask.config.get("distributed.comm.timeouts.connect")
            try:
                self.client = Client(address, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise PostDiffError(
                    f"cannot join the Dask scheduler at {address} within {timeout}: {exc}; check the address and that it is "
                    "running (the wait is Dask's distributed.comm.timeouts.connect)"
                ) from None
        else:
            import os

            n = max(1, (os.cpu_count() or 1) // max(1, threads))
            self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
            self.client = Client(self._cluster)

    def _compute(self, cells, source):
        futures = self.client.map(run_cell, cells, key=[c.key for c in cells], retries=2)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


class RayExecutor(Executor):
    """Cells as Ray tasks. ``address``: an existing cluster (``ray://host:10001`` or ``auto``); none starts Ray on
    this machine. Ray keys nothing by content itself: repeated cells are found by key on the driver."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        super().__init__()
        try:
            import ray
        except ImportError:
            raise PostDiffError("--executor ray needs ray: pip install 'ray==2.60.0'") from None
        self._ray = ray
        ray.init(address=address or None, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        self._task = ray.remote(max_retries=2)(run_cell)

    def _compute(self, cells, source):
        return self._ray.get([self._task.remote(c) for c in cells])

    def close(self) -> None:
        self._ray.shutdown()


def make_executor(name: str = "local", address: str | None = None, *, threads: int = 1) -> Executor:
    """The executor ``--executor`` names; the cluster libraries are imported only when one is asked for."""
    if name not in EXECUTORS:
        raise PostDiffError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if name == "local":
        if address:
            raise PostDiffError("--address joins a cluster; give --executor dask or ray with it")
        return Executor()
    return DaskExecutor(address, threads=threads) if name == "dask" else RayExecutor(address)
