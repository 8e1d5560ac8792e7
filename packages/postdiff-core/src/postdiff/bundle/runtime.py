"""Running a plan from an exported bundle, whatever the backend: the backend only runs graphs.

A backend supplies a ``GraphRunner`` (ONNX Runtime sessions, Core ML functions); this module does the rest the
same way for every backend and the same way the PyTorch path does it: every graph call's inputs are checked
against the manifest (``CheckedRunner``, the one place for it); ``GraphDenoiser`` maps each plan step to the
bundle's graph for its variant and latent size and carries the cache tensors between steps (``StepCaches``);
``BundlePipeline`` hands the conditions, the seed and the loop to the model's family (``postdiff.families``),
which encodes and samples exactly as the PyTorch pipelines do.

No PyTorch is needed: by default the loop runs on numpy arrays with the numpy schedulers
(``postdiff.loop.numpy_schedulers``) and PyTorch-equal random numbers (``postdiff.loop.torch_random``), and prompts are
tokenized with the ``tokenizers`` package. ``generate(..., loop="torch")`` runs the same loop on PyTorch tensors
with diffusers' schedulers instead, the reference the numpy loop is measured against. ``load_bundle`` opens a
bundle with any installed backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from postdiff.bundle import backends
from postdiff.bundle.manifest import UNET, Graph, Manifest, read_manifest
from postdiff.errors import BundleError, warn_once
from postdiff.families.registry import family_named
from postdiff.loop.arrays import NUMPY, TORCH, is_tensor, ops_for
from postdiff.loop.conditioning import Conditioning, PromptEmbeddings
from postdiff.loop.denoiser import StepCaches
from postdiff.loop.sampling import compile_for_scheduler
from postdiff.plan.compiler import ModelSpec, Plan, Step, step_batch, validate_plan
from postdiff.plan.recipe import Recipe, load_recipe
from postdiff.plan.schedulers import same_scheduler_name
from postdiff.profiling import timed_call


class GraphRunner(Protocol):
    def load(self, graph: Graph) -> None:
        """Open (compile, allocate) ``graph`` now rather than on its first run."""

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph of the bundle; inputs and outputs by name."""

    # optional: ``release(graph)`` closes the graph's session and frees what only it held (``LeanRunner`` calls it)
    # optional: ``executed``, a dict of what the runtime actually runs with, read back after loading a graph
    # (``{"device": "CPU", "precision": "bf16"}``, ``{"provider": ...}``): ``report_executed`` fills it


def report_executed(executed: dict[str, str], option: str, asked: str, ran: str, why: str = "") -> None:
    """Record what a runtime actually ran (``executed[option] = ran``) and warn, once per process, in one line when
    it is not what was asked for: a runtime that silently runs another precision or device is reported."""
    executed[option] = ran
    if ran != asked:
        warn_once(f"{option}:{asked}:{ran}", f"--{option} {asked} runs as {ran} here{why}; the results are {ran}'s")


# The order in which a generation needs its graphs: encoders, then the denoiser, then the VAE decoder.
PHASES = {"class_encoder": 0, "text_encoder": 0, "text_encoder_2": 0, UNET: 1, "vae_decoder": 2}
LOW_MEMORY_HELP = (
    "keep only the graphs the generation needs now: the text encoder is closed once the prompt is encoded, each "
    "UNet graph is opened when the plan first calls it and closed after its last call, the VAE decoder is opened "
    "last. Peak memory is about the largest phase instead of the whole bundle; the price is opening graphs again "
    "for every image (batch), seconds each on SD-sized models"
)


def check_feeds(graph: Graph, feeds: dict[str, np.ndarray]) -> None:
    """Every input of ``graph`` given, with its rank and every fixed dimension the manifest records, so a wrong
    shape is named here rather than deep in a runtime's trace."""
    for spec in graph.inputs:
        x = feeds.get(spec.name)
        if x is None:
            raise BundleError(f"graph input {spec.name!r} was not given")
        shape = list(spec.shape)
        if len(x.shape) != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, x.shape)):
            raise BundleError(f"graph input {spec.name!r} has shape {list(x.shape)}, the graph takes {shape} ({graph.name})")


class CheckedRunner:
    """A backend's ``GraphRunner`` behind the input checks of ``check_feeds``."""

    def __init__(self, runner: GraphRunner) -> None:
        self.inner = runner

    def load(self, graph: Graph) -> None:
        self.inner.load(graph)

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(graph, feeds)
        return self.inner.run(graph, feeds)

    def release(self, graph: Graph) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None:
            release(graph)

    def __getattr__(self, name: str):  # the backend's own attributes (sessions, compute units)
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class LeanRunner(CheckedRunner):
    """``--low-memory``: a runner that keeps open only the graphs of the phase running (``PHASES``): the first call
    of a phase closes every graph of the others, so the text encoder is gone before the UNet opens and the UNet
    before the VAE decoder opens; ``GraphDenoiser`` also closes each UNet graph after the plan's last call of it.
    Nothing is opened ahead of its first call (``load`` does nothing)."""

    def __init__(self, runner: GraphRunner) -> None:
        super().__init__(runner)
        self.open: dict[str, Graph] = {}
        lean_allocator()

    def load(self, graph: Graph) -> None:
        pass

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        phase = PHASES.get(graph.role, PHASES[UNET])
        for other in [g for g in self.open.values() if PHASES.get(g.role, PHASES[UNET]) != phase]:
            self.release(other)
        self.open[graph.file] = graph
        return super().run(graph, feeds)

    def release(self, graph: Graph) -> None:
        if self.open.pop(graph.file, None) is not None:
            super().release(graph)
            give_back_freed_memory()

    def close(self) -> None:
        """Close everything still open (the end of a generation)."""
        for graph in list(self.open.values()):
            self.release(graph)


def _glibc():
    """The C library when it is glibc (Linux), for ``mallopt``/``malloc_trim``; else None."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def lean_allocator() -> None:
    """Make the C allocator hand large blocks straight back to the system (glibc: a fixed ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` of 128 kB; the process-wide setting ``--low-memory`` stands for).

    glibc raises its mmap threshold each time it frees a mapped block (up to 32 MB), after which activation-sized
    blocks come from heaps it keeps: measured on the SD1.5 int4 bundle at 256 px, the peak of a whole generation then
    ranged from 740 to 788 MiB (VmHWM, 4 runs) depending on how the VAE's buffers landed, and was 658-659 MiB (5
    runs) with the threshold fixed. Elsewhere (macOS, musl) this does nothing."""
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)


def give_back_freed_memory() -> None:
    """Ask the C allocator to return the memory a closed session freed to the system (glibc's ``malloc_trim``).

    Measured on the SD1.5 int4 bundle: ONNX Runtime's pre-packed weights are heap memory, and glibc kept them after
    the sessions closed, so the process went into its VAE phase still holding 500 MiB it no longer used. Elsewhere
    (macOS, musl) this does nothing."""
    import ctypes

    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def _np(x) -> np.ndarray:
    return ops_for(x).numpy(x)


LOOPS = {"numpy": NUMPY, "torch": TORCH}  # what holds the arrays between graph calls


def _xattn_indices(names: list[str]) -> list[int]:
    return [int(n.split("_", 1)[1]) for n in names if n.startswith("xattn_")]


class GraphDenoiser:
    """A ``Denoiser`` over a bundle's UNet graphs (the dynamic ones, or with ``static`` the fixed-shape copies)."""

    def __init__(self, manifest: Manifest, runner: GraphRunner, *, static: bool = False, last_calls: dict | None = None) -> None:
        self.manifest, self.runner, self.static = manifest, runner, static
        self.caches = StepCaches()
        # {step index: graphs the plan calls for the last time there}: closed after that call (LeanRunner only)
        self.last_calls = last_calls or {}

    def reset(self) -> None:
        self.caches.clear()

    def __call__(self, step: Step, sample, timestep, cond: Conditioning):
        """The graph's ``eps`` for this step: a numpy array, or a tensor when ``sample`` is one."""
        caches = self.caches
        caches.begin(step, tuple(sample.shape[-2:]))
        batch = int(sample.shape[0])
        graph = self.manifest.unet_graph(step.variant, step.latent_hw, batch, static=self.static)
        feeds = {
            "sample": _np(sample).astype(np.float32, copy=False),
            "timestep": np.full((batch,), float(timestep), dtype=np.float32),
            "encoder_hidden_states": _np(cond.encoder_hidden_states),
        }
        if "text_embeds" in graph.input_names:
            feeds["text_embeds"] = _np(cond.text_embeds)
            feeds["time_ids"] = _np(cond.time_ids).astype(np.float32)
        if "pooled_projections" in graph.input_names:  # an MMDiT's (SD3): the pooled text embedding
            feeds["pooled_projections"] = _np(cond.text_embeds).astype(np.float32, copy=False)
        if "timestep_cond" in graph.input_names:
            feeds["timestep_cond"] = _np(cond.timestep_cond).astype(np.float32, copy=False)
        for name in ("encoder_attention_mask", "resolution", "aspect_ratio"):  # PixArt's
            if name in graph.input_names:
                feeds[name] = _np(getattr(cond, name)).astype(np.float32, copy=False)
        if "deep" in graph.input_names:
            feeds["deep"] = caches.deep_for(step, cond)
        wanted = _xattn_indices(graph.input_names)
        if wanted:
            feeds.update({f"xattn_{i}": x for i, x in zip(wanted, caches.xattn_for(step, wanted))})
        with timed_call(step.variant, step.latent_hw, batch):
            out = self.runner.run(graph, feeds)
        if step.unet == "full":
            caches.keep_deep(step, out["deep"], cond)
        if step.xattn == "capture":
            got = _xattn_indices(graph.output_names)
            caches.keep_xattn(step, got, [out[f"xattn_{i}"] for i in got], cond)
        eps = np.ascontiguousarray(out["eps"])
        for done in self.last_calls.get(step.index, ()):
            self.runner.release(done)
        return TORCH.asarray(eps) if is_tensor(sample) else eps


class BundlePipeline:
    """Generation from a bundle: ``generate(conditions, plan, seed)`` -> N x H x W x C floats in [0, 1].

    Conditions are what the model's family takes: class labels (class-conditional models) or prompts (SD, SDXL).
    Images pair with the PyTorch runs of the same seed (the family draws the noise the same way on both paths).
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        runner: GraphRunner,
        *,
        static: bool = False,
        static_batch: int | None = None,
        low_memory: bool = False,
    ) -> None:
        self.low_memory = bool(low_memory)
        checked = LeanRunner(runner) if self.low_memory else CheckedRunner(runner)
        self.folder, self.manifest, self.runner, self.static = Path(folder), manifest, checked, static
        self.static_batch = manifest.images_per_call if static_batch is None else static_batch
        self.plan_note: str | None = None  # set by compile() when the plan run is not the stored one
        self.final_latents: np.ndarray | None = None  # the latents the last generate() ended with
        self.info = manifest.model
        self.family = family_named(self.info["kind"])
        if not self.family.generates:
            raise BundleError(
                f"this bundle holds UNet graphs only ({self.info['name']} has no text encoder or VAE): it serves "
                f"per-graph benchmarks, not generation. Export a pipeline model to generate"
            )
        left_out = [r for r in self.info.get("without", ()) if r in self.family.optional_roles]  # --no-text-encoder
        missing = [role for role in self.family.roles if role not in left_out and not any(g.role == role for g in manifest.graphs)]
        if missing:
            raise BundleError(f"this {self.family.name} bundle lacks its {', '.join(missing)} graph(s); re-export it")
        self.spec = ModelSpec(**self.info["spec"])

    @property
    def kind(self) -> str:
        return self.family.name

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.info["latent_hw"])

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.info["image_hw"])

    def run(self, graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(graph, feeds)

    def scheduler(self, name: str | None = None, ops=NUMPY):
        """The bundle's scheduler (or ``name``): numpy's by default, diffusers' with ``ops=TORCH``."""
        return self.family.scheduler(name or self.info.get("scheduler"), self.info["scheduler_config"], ops)

    def parse_condition(self, text):
        """A user's condition (``--prompt``; None: the family's default) as this bundle's model takes it."""
        return self.family.parse_condition(text, self.info)

    def compile(self, recipe: str | Recipe | dict | None = None, steps: int | None = None, scheduler: str | None = None) -> Plan:
        """The plan to run. With no change asked for, the bundle's stored plan (``manifest.plan``, the steps an app
        executes), validated; a recipe, step count or scheduler other than the stored ones recompiles it from the
        recipe, and ``plan_note`` says so. Refused, before any graph runs, if invalid or if the bundle lacks a graph."""
        stored = Recipe.from_dict(self.manifest.recipe)
        wanted = load_recipe(recipe) if recipe is not None else stored
        if steps is not None:
            wanted = wanted.with_steps(steps)
        same_scheduler = scheduler is None or same_scheduler_name(scheduler, self.info.get("scheduler"))
        if wanted.to_dict() == stored.to_dict() and same_scheduler:
            plan = Plan.from_dict(self.manifest.plan, where=f"{self.folder / 'manifest.json'}: plan")
            validate_plan(plan, self.spec)
            self.plan_note = None
        else:
            plan = compile_for_scheduler(wanted, self.scheduler(scheduler), self.latent_hw, self.spec)
            changed = [
                what for what, differs in (("plan", wanted.label != stored.label), ("steps", wanted.steps != stored.steps)) if differs
            ]
            changed += [] if same_scheduler else ["scheduler"]
            self.plan_note = f"{', '.join(changed) or 'recipe'} {'differs' if changed in (['plan'], ['scheduler']) else 'differ'} from the bundle's: plan {plan.name} recompiled from its recipe instead of the stored plan"
        self.manifest.check_plan(plan, static=self.static, batch_of=self._static_batch_of)
        return plan

    def _static_batch_of(self, step: Step) -> int:
        """The batch of a fixed-shape graph call at ``step``: 2N on CFG steps of a bundle exported with CFG, else N."""
        return step_batch(step.guidance, self.static_batch, self.info.get("guidance", 1.0) > 1.0 and not self.spec.guidance_embedded)

    def last_calls(self, plan: Plan) -> dict[int, list[Graph]]:
        """{step index: the UNet graphs ``plan`` calls for the last time at that step}."""
        last: dict[str, tuple[int, Graph]] = {}
        for step in plan.steps:
            batch = self._static_batch_of(step) if self.static else None
            graph = self.manifest.unet_graph(step.variant, step.latent_hw, batch, static=self.static)
            last[graph.file] = (step.index, graph)
        out: dict[int, list[Graph]] = {}
        for index, graph in last.values():
            out.setdefault(index, []).append(graph)
        return out

    def open(self, plan: Plan) -> None:
        """Load every graph ``plan`` runs (its UNet graphs and the encoders and decoder around them) now, so that
        the first generation pays no loading cost (with ``low_memory``, nothing: graphs open when first called)."""
        if self.low_memory:
            return
        for step in plan.steps:
            batch = self._static_batch_of(step) if self.static else None
            self.runner.load(self.manifest.unet_graph(step.variant, step.latent_hw, batch, static=self.static))
        for graph in self.manifest.graphs:
            if graph.role != UNET:
                self.runner.load(graph)

    def generate(
        self,
        conditions: Sequence,
        plan: Plan | str | Recipe | None = None,
        *,
        seed: int = 0,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        batch_size: int = 100,
        progress: bool = False,
        loop: str = "numpy",
    ) -> np.ndarray:
        """Images N x H x W x C, floats in [0, 1], one per condition. ``loop``: "numpy" (no PyTorch needed) or
        "torch" (diffusers' schedulers on tensors; the reference the numpy loop matches)."""
        if loop not in LOOPS:
            raise BundleError(f"unknown loop {loop!r}; use one of {', '.join(LOOPS)}")
        if isinstance(plan, Plan):
            scheduler = scheduler or plan.scheduler  # the scheduler the plan was compiled for (``compile``)
        else:
            plan = self.compile(plan, scheduler=scheduler)
        guidance = float(guidance_scale if guidance_scale is not None else self.info.get("guidance", 1.0))
        last = self.last_calls(plan) if self.low_memory else None
        denoiser = GraphDenoiser(self.manifest, self.runner, static=self.static, last_calls=last)
        try:
            return self.family.generate_bundle(
                self,
                conditions,
                plan,
                denoiser,
                seed=seed,
                guidance=guidance,
                scheduler=scheduler,
                batch_size=batch_size,
                progress=progress,
                ops=LOOPS[loop],
            )
        finally:
            if self.low_memory:
                self.runner.close()

    # -- prompt encoding, for the text families ---------------------------------------------------------------------
    def _tokenizer(self, name: str, length: int | None = None):
        cache = self.__dict__.setdefault("_tokenizers", {})
        if (name, length) not in cache:
            cache[name, length] = BundleTokenizer(self.folder / name, length)
        return cache[name, length]

    def encode_masked(self, text: str, role: str, tokenizer: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(hidden states, attention mask) of one prompt through an encoder that takes the mask (PixArt's T5), padded
        to ``length`` tokens as the pipelines pad them (``max_sequence_length``)."""
        ids, mask = self._tokenizer(tokenizer, length).ids_and_mask(text)
        out = self.runner.run(self.manifest.graph(role), {"input_ids": ids, "attention_mask": mask})
        return out["hidden_states"], mask

    def encode_ids(self, text: str, role: str, tokenizer: str, length: int | None = None) -> dict[str, np.ndarray]:
        """The outputs of text encoder graph ``role`` for one prompt, tokenized by the bundle's ``tokenizer`` folder and
        padded to ``length`` tokens (default: the tokenizer's maximum)."""
        return self.runner.run(self.manifest.graph(role), {"input_ids": self._tokenizer(tokenizer, length).ids(text)})

    def encode_prompt(self, text: str, roles: Sequence[str], tokenizers: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(hidden states of the ``roles`` encoders concatenated, pooled text embeddings of those that give one
        concatenated, or None) for one prompt, as the diffusers pipelines compute them (SDXL: the second encoder's
        pooled output; SD3: both CLIPs')."""
        hidden, pooled = [], []
        for role, tok_name in zip(roles, tokenizers):
            out = self.encode_ids(text, role, tok_name)
            hidden.append(out["hidden_states"])
            if "text_embeds" in out:
                pooled.append(out["text_embeds"])
        return np.concatenate(hidden, axis=-1), (np.concatenate(pooled, axis=-1) if pooled else None)


class BundleTokenizer:
    """A bundle's tokenizer folder (``tokenizer.json`` and ``tokenizer_config.json``, as transformers saves a fast
    tokenizer), read with the ``tokenizers`` package: ids padded and truncated to the model's length, as the
    diffusers pipelines ask transformers for them."""

    def __init__(self, folder: Path, length: int | None = None) -> None:
        import json

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise BundleError(f"the bundle has no {folder.name}/tokenizer.json; re-export it with this version")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BundleError("prompts need the tokenizers package: pip install tokenizers") from None
        config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if length is None:
            length = int(config.get("model_max_length", 77))
            if length > 100_000:  # transformers' "no limit" sentinel
                length = 77
        pad = config.get("pad_token") or "<|endoftext|>"
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise BundleError(f"{folder.name}: pad token {pad!r} is not in the vocabulary; re-export the bundle")
        self.tokenizer.enable_truncation(max_length=length)
        self.tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=pad)
        self.length = length

    def ids(self, text: str) -> np.ndarray:
        """1 x length int64 token ids of ``text``."""
        return np.asarray([self.tokenizer.encode(text).ids], dtype=np.int64)

    def ids_and_mask(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """1 x length int64 token ids and their float32 attention mask (1 for a token, 0 for padding)."""
        enc = self.tokenizer.encode(text)
        return np.asarray([enc.ids], dtype=np.int64), np.asarray([enc.attention_mask], dtype=np.float32)


def bundle_condition(pipe: BundlePipeline, prompt: str | None, prompt_embeds: str | None = None):
    """What a bundle command generates from: the prompt, or the prompt embeddings file (``--prompt-embeds``)."""
    if prompt_embeds is None:
        return pipe.parse_condition(prompt)
    if prompt is not None:
        raise BundleError("give --prompt or --prompt-embeds, not both")
    if "text_encoder" not in pipe.family.optional_roles:
        raise BundleError(f"--prompt-embeds is for PixArt bundles; this {pipe.family.name} bundle encodes its prompts itself: use --prompt")
    return PromptEmbeddings.load(prompt_embeds)


def load_bundle(folder: str | Path, backend, *, verify: bool = True, low_memory: bool = False, **options) -> BundlePipeline:
    """Open the bundle in ``folder`` with ``backend`` (a ``Backend`` or an installed backend's name), after checking
    its manifest and the checksum of every file; ``options`` are the backend's runner options. ``low_memory``:
    ``LeanRunner`` (``LOW_MEMORY_HELP``)."""
    backend = backends.get(backend) if isinstance(backend, str) else backend
    backend.check_open(**options)
    folder, manifest = read_manifest(folder, backend.bundle_format or backend.name, verify=verify)
    backend.check_bundle(manifest, **options)
    runner, static = backend.open_runner(folder, manifest, low_memory=low_memory, **options)
    return BundlePipeline(folder, manifest, runner, static=static, low_memory=low_memory)
