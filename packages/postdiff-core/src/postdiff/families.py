"""Model families: everything that depends on what kind of model a run or a bundle holds, in one object per kind.

A ``Family`` owns the decisions that used to be checks of a model's name: how a condition is parsed and encoded,
the default guidance, the per-image random generator for a seed, the scheduler by name, which graphs an exported
bundle holds around the UNet and what its manifest records, and how a bundle's graphs are driven to make images.
The PyTorch path (``postdiff.models.Model.family``) and the bundle path (``BundlePipeline.family``, from the
manifest's ``kind``) ask the same object, so a torch run and a bundle run of one seed stay paired.

Families are registered by name, the way diffusers registers per-model hooks and cache-dit its per-model adapters:

    @register_family
    class MyFamily(Family):
        name = "my-dit"
        def matches(self, model): return hasattr(model.pipeline, "transformer")
        ...

``family_of(model)`` returns the first family whose ``matches`` accepts the model (a subclass is asked before its
base, the others in registration order: the most specific are registered first); ``family_named(kind)`` the one a manifest names. Torch is imported inside the methods that
need it: the manifest and plan half of the engine stays importable without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import BundleError, ModelError, RecipeError, brief
from .plan import guidance_dim

if TYPE_CHECKING:  # pragma: no cover
    from .models import Model

# Image i of a request with seed s draws its noise from a generator seeded with image_seed(s, i), on every path
# (PyTorch pipelines, bundles, every backend): the same seed gives paired images under every plan and batch size.
SEED_STRIDE = 1_000_003


def image_seed(seed: int, index: int) -> int:
    return int(seed) * SEED_STRIDE + int(index)


def scheduler_from_config(name: str, config: dict[str, Any]):
    """A diffusers scheduler by name (a short name of ``postdiff.schedulers`` or a class name), built from a scheduler
    configuration with the name's settings over it (the one lookup of the engine)."""
    import diffusers

    from .schedulers import NAMES, resolve, warn_if_sigmas_explode

    class_name, settings = resolve(name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config") or not hasattr(cls, "set_timesteps"):
        raise ModelError(f"unknown scheduler {brief(name)}; use one of {', '.join(NAMES)}, or a diffusers scheduler class name")
    scheduler = cls.from_config({**dict(config), **settings})
    warn_if_sigmas_explode(scheduler, str(name))
    return scheduler


class Family:
    """The base: what every family shares. Subclasses set ``name`` and override what differs."""

    name = "base"
    aliases: tuple[str, ...] = ()  # older manifest kinds that mean this family
    default_guidance = 7.5  # diffusers' default for SD pipelines
    condition = "prompt"  # what a condition is: "prompt" (text) or "label" (class index)
    roles: tuple[str, ...] = ()  # the graphs a bundle holds besides its UNet graphs
    optional_roles: tuple[str, ...] = ()  # roles an export may leave out (``--no-text-encoder``), noted in the manifest
    tokenizers: tuple[str, ...] = ()  # tokenizer folders a bundle holds
    generates = True  # False: a bundle of this family serves per-graph benchmarks only

    # -- recognising a model -------------------------------------------------------------------------------------
    def matches(self, model: Model) -> bool:
        raise NotImplementedError

    # -- conditions ----------------------------------------------------------------------------------------------
    def parse_condition(self, text: str | int | None, info: dict[str, Any]) -> Any:
        """A user's condition (``--prompt``) as this family takes it; None gives the family's default."""
        return "a photograph of an astronaut riding a horse" if text is None else str(text)

    def default_conditions(self, n: int, info: dict[str, Any]) -> list:
        prompts = ("a red apple on a table", "a lighthouse at dusk", "a cat wearing sunglasses", "a bowl of ramen")
        return [prompts[i % len(prompts)] for i in range(n)]

    # -- randomness and schedulers -------------------------------------------------------------------------------
    def generator(self, seed: int, index: int, ops=None):
        """Image ``index``'s generator for ``seed``: a torch.Generator, or its numpy twin with ``ops=NUMPY``."""
        from .arrays import TORCH

        return (ops or TORCH).generator(image_seed(seed, index))

    def scheduler(self, name: str | None, config: dict[str, Any], ops=None):
        """The scheduler by name (``postdiff.schedulers``: a short name or a class name; None: the configuration's
        own class): diffusers' class, or with ``ops=NUMPY`` its numpy twin (``postdiff.numpy_schedulers``)."""
        from .arrays import TORCH
        from .schedulers import resolve

        own = config.get("_class_name", "DDIMScheduler")
        name = name or own
        if resolve(name)[0] != own:  # the model's own scheduler class is always its to use
            self.check_scheduler(name)
        return (ops or TORCH).scheduler(name, config)

    def check_scheduler(self, name: str) -> None:
        """Refuse, before any work, a scheduler this family's models cannot sample with."""
        from .schedulers import resolve

        if resolve(name)[0] == "LCMScheduler":
            raise ModelError(
                f"--scheduler {name}: LCMScheduler samples LCM-distilled models (LatentConsistencyModelPipeline); this "
                f"{self.name} model was not distilled for it. Use ddim, euler, dpmpp-2m-karras or another of its schedulers"
            )

    def condition_info(self, pipe) -> dict[str, Any]:
        """What ``parse_condition`` needs from a loaded pipeline (also recorded in a bundle's manifest)."""
        return {}

    def guidance(self, value: float | None) -> float:
        return self.default_guidance if value is None else float(value)

    def call_options(self) -> dict[str, Any]:
        """Options of the diffusers pipeline's ``__call__`` that make it generate what a bundle of this family does."""
        return {}

    # -- export ---------------------------------------------------------------------------------------------------
    def pipeline_graphs(self, model: Model) -> list:
        """The graphs (``postdiff.graphs.GraphSource``) around the UNet that generation from a bundle needs."""
        return []

    def bundle_info(self, model: Model) -> dict[str, Any]:
        """What the manifest's ``model`` records for this family beyond the common fields."""
        return {"guidance": self.default_guidance}

    # -- generation from a bundle -------------------------------------------------------------------------------
    def generate_bundle(self, pipe, conditions: Sequence, plan, denoiser, *, seed, guidance, scheduler, batch_size, progress, ops):
        """Images N x H x W x C floats in [0, 1] from a bundle's graphs (``pipe``), arrays held by ``ops``."""
        raise BundleError(f"{self.name} bundles cannot generate images")


FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Register a family class (decorator); a later registration of the same name replaces the earlier one."""
    family = cls()
    FAMILIES[family.name] = family
    return cls


def family_named(kind: str) -> Family:
    for family in FAMILIES.values():
        if kind == family.name or kind in family.aliases:
            return family
    raise BundleError(f"unknown model family {brief(kind)} in the bundle; known: {', '.join(FAMILIES)}. Re-export it with this version")


def family_of(model: Model) -> Family:
    """The family that recognises ``model``: a subclass before its base (LCM before SD), else in registration order."""
    for family in sorted(FAMILIES.values(), key=lambda f: -len(type(f).__mro__)):
        if family.matches(model):
            return family
    raise ModelError(f"{model.name}: no model family recognises it (known: {', '.join(FAMILIES)})")


@register_family
class ClassConditional(Family):
    """A class-conditional UNet whose class tokens come from a class encoder (the embedded reference models):
    the class tokens play the text embeddings' role, the null class is the empty condition for CFG."""

    name = "class-conditional"
    aliases = ("reference",)
    default_guidance = 3.0
    condition = "label"
    roles = ("class_encoder",)

    def matches(self, model) -> bool:
        return hasattr(model.pipeline, "class_encoder")

    def parse_condition(self, text, info) -> int:
        """A class index, or a class name from the model's ``class_names`` (case and "/" ignored, plus its aliases)."""
        n = int(info.get("num_classes", 10))
        if text is None:
            return int(info.get("default_class", n - 1))
        if isinstance(text, int) or str(text).strip().isdigit():
            label = int(text)
            if 0 <= label < n:
                return label
        else:
            names = {c.lower(): i for i, c in enumerate(info.get("class_names") or ())}
            names |= {c.lower().replace("/", " "): i for i, c in enumerate(info.get("class_names") or ())}
            names |= {k.lower(): int(v) for k, v in (info.get("class_aliases") or {}).items()}
            key = str(text).strip().lower()
            if key in names and not key.isdigit():
                return names[key]
        noun = info.get("class_noun", "class")
        named = [c for c in info.get("class_names") or () if not c.isdigit()]
        raise RecipeError(f"unknown {noun} {brief(text)}; use 0-{n - 1}" + (f" or one of: {', '.join(named)}" if named else ""))

    def default_conditions(self, n, info) -> list:
        return [i % int(info.get("num_classes", 10)) for i in range(n)]

    def pipeline_graphs(self, model) -> list:
        import torch

        from .graphs import ClassEncoderGraph, GraphSource, batch_dim

        def labels(hw, b):
            return {"labels": torch.arange(b) % int(model.pipeline.num_classes)}

        enc = ClassEncoderGraph(model.pipeline.class_encoder).eval()
        return [GraphSource("class_encoder", "class_encoder", enc, ["labels"], ["encoder_hidden_states"], labels, ({0: batch_dim()},))]

    def bundle_info(self, model) -> dict[str, Any]:
        pipe = model.pipeline
        return {
            "guidance": self.default_guidance,
            "null_class": int(pipe.null_class),
            "num_classes": int(pipe.num_classes),
            **{k: v for k, v in self.condition_info(pipe).items() if k != "num_classes"},
            "training_sizes": list(model.training_sizes or ()),
        }

    def condition_info(self, pipe) -> dict[str, Any]:
        """What ``parse_condition`` needs from a class-conditional pipeline (also stored in the manifest)."""
        return {
            "num_classes": int(pipe.num_classes),
            "class_names": list(getattr(pipe, "class_names", ()) or ()),
            "class_aliases": dict(getattr(pipe, "class_aliases", {}) or {}),
            "class_noun": getattr(pipe, "class_noun", "class"),
            "default_class": int(getattr(pipe, "default_class", int(pipe.num_classes) - 1)),
            "dataset": getattr(pipe, "dataset", None),
        }

    def sample(
        self,
        labels: Sequence[int],
        plan,
        denoiser,
        encode: Callable,
        make_scheduler: Callable[[], object],
        *,
        null_class: int,
        num_classes: int,
        channels: int = 1,
        seed: int,
        guidance_scale: float,
        batch_size: int,
        progress: bool = False,
        ops=None,
        latents_out: list | None = None,
        first: int = 0,
    ):
        """The class-conditional sampling loop, whatever runs the networks (PyTorch, a bundle's graphs) and whatever
        holds the arrays (``ops``: ``postdiff.arrays.TORCH`` by default, ``NUMPY`` for the runtime without PyTorch):
        ``encode`` maps class indices to tokens, ``denoiser`` runs plan steps. uint8 images N x H x W (pixel space)."""
        import numpy as np

        from .arrays import TORCH
        from .conditioning import Conditioning
        from .sampling import run_plan

        ops = ops or TORCH
        labels = [int(y) for y in labels]
        h, w = plan.latent_hw  # pixel space: the image size
        if len(labels) == 0:
            return np.zeros((0, h, w), dtype=np.uint8)
        if min(labels) < 0 or max(labels) >= num_classes:
            raise RecipeError(f"labels must be class indices 0-{num_classes - 1}")
        # image i of the request is sample first + i: a shard of a larger request draws that sample's noise
        noise = ops.cat([ops.randn((1, channels, h, w), self.generator(seed, first + i, ops)) for i in range(len(labels))])
        out = []
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size]
            if guidance_scale > 1.0:  # null class first, as diffusers lays out CFG batches
                cond = Conditioning(encode(ops.asarray([null_class] * len(y) + y, dtype="int64")), has_uncond=True)
            else:
                cond = Conditioning(encode(ops.asarray(y, dtype="int64")), has_uncond=False)
            sch = make_scheduler()
            # per-sample generators for the noise drawn later (resolution switch, ancestral samplers)
            g = [ops.generator(seed * 7919 + first + i) for i in range(start, start + len(y))]
            x = noise[start : start + batch_size] * sch.init_noise_sigma
            x = run_plan(
                plan, denoiser, sch, cond, guidance_scale=guidance_scale, generator=g, latents=x, channels=channels, progress=progress
            )
            out.append(ops.to_uint8_images(x)[:, 0])
            if latents_out is not None:  # the final latents too (golden tensors)
                latents_out.append(ops.numpy(x))
        return np.concatenate(out)

    def generate_bundle(self, pipe, conditions, plan, denoiser, *, seed, guidance, scheduler, batch_size, progress, ops):
        import numpy as np

        info = pipe.info
        graph = pipe.manifest.graph("class_encoder")
        if pipe.static:
            if len(conditions) % pipe.static_batch:
                raise RecipeError(
                    f"static graphs run exactly {pipe.static_batch} images per call; ask for a multiple of {pipe.static_batch}"
                )
            batch_size = pipe.static_batch

        def encode(y):
            tokens = pipe.run(graph, {"labels": np.asarray(ops.numpy(y), dtype=np.int64)})["encoder_hidden_states"]
            return ops.asarray(tokens)

        latents: list = []
        images = self.sample(
            conditions,
            plan,
            denoiser,
            encode,
            lambda: pipe.scheduler(scheduler, ops),
            null_class=int(info.get("null_class", 10)),
            num_classes=int(info.get("num_classes", 10)),
            channels=int(info.get("in_channels", 1)),
            seed=seed,
            guidance_scale=guidance,
            batch_size=batch_size,
            progress=progress,
            ops=ops,
            latents_out=latents,
        )
        pipe.final_latents = np.concatenate(latents) if latents else None
        return images.astype(np.float32)[..., None] / 255.0


class TextToImage(Family):
    """What the diffusers text-to-image families share: one prompt per image, the prompt's conditioning from the
    bundle's text encoder graphs (``conditioning``), a VAE decoder at the end."""

    def conditioning(self, pipe, prompt: str, guidance: float, ops):
        """The ``Conditioning`` of one prompt at ``guidance`` (the negative half first when that is a CFG batch), in
        ``ops``' arrays."""
        raise NotImplementedError

    def generate_bundle(self, pipe, conditions, plan, denoiser, *, seed, guidance, scheduler, batch_size, progress, ops):
        import numpy as np

        from .sampling import run_plan

        if pipe.static and pipe.static_batch != 1:
            raise BundleError(
                f"SD bundles run one prompt per call; this one was exported for {pipe.static_batch} (re-export with --batch 1)"
            )
        vae = pipe.manifest.graph("vae_decoder")
        images, finals = [], []
        for i, prompt in enumerate(conditions):
            cond = self.conditioning(pipe, prompt, guidance, ops)
            gen = self.generator(seed, i, ops)
            sch = pipe.scheduler(scheduler, ops)
            sch.set_timesteps(plan.recipe.steps)
            latents = ops.randn((1, pipe.info["in_channels"], *pipe.latent_hw), gen) * sch.init_noise_sigma
            latents = run_plan(plan, denoiser, sch, cond, guidance_scale=guidance, generator=gen, latents=latents, progress=progress)
            finals.append(np.asarray(ops.numpy(latents), dtype=np.float32))
            image = pipe.run(vae, {"latents": finals[-1]})["image"]
            images.append(np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)[0])
        pipe.final_latents = np.concatenate(finals) if finals else None
        return np.stack(images).astype(np.float32)


@register_family
class StableDiffusionXL(TextToImage):
    """SDXL: two text encoders (the penultimate layer of each, concatenated; the second's pooled projection) and
    the size conditioning ``time_ids``."""

    name = "sdxl"
    roles = ("text_encoder", "text_encoder_2", "vae_decoder")
    tokenizers = ("tokenizer", "tokenizer_2")

    def matches(self, model) -> bool:
        return getattr(model.pipeline, "text_encoder_2", None) is not None

    def pipeline_graphs(self, model) -> list:
        from .graphs import text_encoder_graph, vae_decoder_graph

        pipe = model.pipeline
        return [
            text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, penultimate=True, pooled=False),
            text_encoder_graph("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2, penultimate=True, pooled=True),
            vae_decoder_graph(pipe.vae),
        ]

    def bundle_info(self, model) -> dict[str, Any]:
        return {
            "guidance": self.default_guidance,
            "force_zeros_for_empty_prompt": bool(model.pipeline.config.get("force_zeros_for_empty_prompt", True)),
        }

    def conditioning(self, pipe, prompt: str, guidance: float, ops):
        from .conditioning import Conditioning

        cfg = guidance > 1.0
        ehs, pooled = (ops.asarray(x) for x in pipe.encode_prompt(prompt, self.roles[:-1], self.tokenizers))
        h, w = pipe.image_hw
        time_ids = ops.like(ops.asarray([[h, w, 0, 0, h, w]]), ehs)
        if not cfg:
            return Conditioning(ehs, has_uncond=False, text_embeds=pooled, time_ids=time_ids)
        if pipe.info.get("force_zeros_for_empty_prompt", True):
            neg, neg_pooled = ops.zeros_like(ehs), ops.zeros_like(pooled)
        else:
            neg, neg_pooled = (ops.asarray(x) for x in pipe.encode_prompt("", self.roles[:-1], self.tokenizers))
        return Conditioning(
            ops.cat([neg, ehs]), has_uncond=True, text_embeds=ops.cat([neg_pooled, pooled]), time_ids=ops.cat([time_ids, time_ids])
        )


@register_family
class StableDiffusion(TextToImage):
    """SD 1.x / 2.x: one text encoder (its last layer), no pooled embedding or size conditioning."""

    name = "sd"
    roles = ("text_encoder", "vae_decoder")
    tokenizers = ("tokenizer",)

    def matches(self, model) -> bool:
        pipe = model.pipeline
        return hasattr(pipe, "text_encoder") and hasattr(pipe, "vae") and getattr(pipe, "unet", None) is not None

    def pipeline_graphs(self, model) -> list:
        from .graphs import text_encoder_graph, vae_decoder_graph

        pipe = model.pipeline
        return [
            text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, penultimate=False, pooled=False),
            vae_decoder_graph(pipe.vae),
        ]

    def bundle_info(self, model) -> dict[str, Any]:
        return {"guidance": self.default_guidance}

    def conditioning(self, pipe, prompt: str, guidance: float, ops):
        from .conditioning import Conditioning

        ehs = ops.asarray(pipe.encode_prompt(prompt, self.roles[:-1], self.tokenizers)[0])
        if guidance <= 1.0:
            return Conditioning(ehs, has_uncond=False)
        neg = ops.asarray(pipe.encode_prompt("", self.roles[:-1], self.tokenizers)[0])
        return Conditioning(ops.cat([neg, ehs]), has_uncond=True)


@register_family
class LatentConsistency(StableDiffusion):
    """LCM distillations of SD 1.x/2.x (``LatentConsistencyModelPipeline``, ``LCMScheduler``): guidance is not a CFG
    batch but a UNet input, the sinusoidal embedding of w = guidance - 1 (``timestep_cond``, as the pipeline makes it):
    one UNet branch per image and step, no negative prompt."""

    name = "lcm"
    default_guidance = 8.5  # LatentConsistencyModelPipeline's default

    def matches(self, model) -> bool:
        return super().matches(model) and guidance_dim(model.unet_config) is not None

    def bundle_info(self, model) -> dict[str, Any]:
        return {"guidance": self.default_guidance, "time_cond_proj_dim": guidance_dim(model.unet_config)}

    def scheduler(self, name, config, ops=None):
        """LCMScheduler only: the model was distilled for its consistency steps (and the diffusers pipeline passes
        ``original_inference_steps``, which other schedulers refuse)."""
        from .schedulers import resolve

        if name is not None and resolve(name)[0] != "LCMScheduler":
            raise ModelError(f"LCM models sample with LCMScheduler (lcm) only, not {brief(name)}; drop --scheduler")
        return super().scheduler("LCMScheduler", config, ops)

    def check_scheduler(self, name: str) -> None:
        pass

    def conditioning(self, pipe, prompt: str, guidance: float, ops):
        from .conditioning import Conditioning, guidance_embedding

        ehs = ops.asarray(pipe.encode_prompt(prompt, self.roles[:-1], self.tokenizers)[0])
        w = guidance_embedding(guidance - 1.0, int(pipe.info["time_cond_proj_dim"]), batch=int(ehs.shape[0]))
        return Conditioning(ehs, has_uncond=False, timestep_cond=ops.like(ops.asarray(w), ehs))


@register_family
class PixArt(TextToImage):
    """PixArt-α and PixArt-Σ (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): a DiT (``PixArtTransformer2DModel``)
    conditioned on T5 tokens with their attention mask; PixArt-α at 1024 px also on the image's resolution and aspect
    ratio. The negative prompt is the empty one, encoded (the pipelines' default); prompts are lower-cased and
    stripped, as the pipelines preprocess them without the optional caption cleaner (beautifulsoup4 and ftfy)."""

    name = "pixart"
    default_guidance = 4.5  # the PixArt pipelines' default
    roles = ("text_encoder", "vae_decoder")
    optional_roles = ("text_encoder",)  # T5-XXL: an app may encode prompts elsewhere (PromptEmbeddings)
    tokenizers = ("tokenizer",)

    def matches(self, model) -> bool:
        return (
            getattr(model.pipeline, "transformer", None) is not None
            and type(model.pipeline.transformer).__name__ == "PixArtTransformer2DModel"
        )

    def call_options(self) -> dict[str, Any]:
        """The size asked for, not the nearest aspect-ratio bin (a bundle runs the size it was exported at), and the
        prompt preprocessing a bundle does (lower case, stripped) without the optional caption cleaner."""
        return {"use_resolution_binning": False, "clean_caption": False}

    def pipeline_graphs(self, model) -> list:
        from .graphs import masked_text_encoder_graph, vae_decoder_graph

        pipe = model.pipeline
        return [masked_text_encoder_graph("text_encoder", pipe.text_encoder, pipe.tokenizer, model.text_len), vae_decoder_graph(pipe.vae)]

    def bundle_info(self, model) -> dict[str, Any]:
        return {
            "guidance": self.default_guidance,
            "resolution_conditioned": bool(model.pipeline.transformer.use_additional_conditions),
        }

    def conditioning(self, pipe, prompt, guidance: float, ops):
        """``prompt``: text, or a ``PromptEmbeddings`` (the only kind a bundle exported without its T5 encoder takes)."""
        from .conditioning import Conditioning, PromptEmbeddings

        length = int(pipe.info["text_len"])
        given = prompt if isinstance(prompt, PromptEmbeddings) else None
        if given is None and "text_encoder" in pipe.info.get("without", ()):
            raise BundleError(
                "this bundle was exported without its T5 text encoder (--no-text-encoder): give the prompt as embeddings "
                "(--prompt-embeds FILE.npz with prompt_embeds and prompt_attention_mask, and the negative pair for guidance)"
            )

        def encode(negative: bool):
            if given is None:
                text = "" if negative else str(prompt)
                ehs, mask = pipe.encode_masked(text.lower().strip(), self.roles[0], self.tokenizers[0], length)
            elif negative:
                ehs, mask = given.negative_prompt_embeds, given.negative_prompt_attention_mask
                if ehs is None:
                    raise BundleError(
                        f"guidance {guidance:g} needs negative_prompt_embeds and negative_prompt_attention_mask; add them, or use --guidance 1"
                    )
            else:
                ehs, mask = given.prompt_embeds, given.prompt_attention_mask
            return ops.asarray(ehs), ops.like(ops.asarray(mask), ops.asarray(ehs))

        ehs, mask = encode(negative=False)
        resolution = aspect = None
        if pipe.info.get("resolution_conditioned"):
            h, w = pipe.image_hw
            resolution, aspect = (ops.like(ops.asarray(x), ehs) for x in ([[h, w]], [[h / w]]))
        if guidance <= 1.0:
            return Conditioning(ehs, has_uncond=False, encoder_attention_mask=mask, resolution=resolution, aspect_ratio=aspect)
        neg, neg_mask = encode(negative=True)

        def both(x):
            return None if x is None else ops.cat([x, x])

        return Conditioning(
            ops.cat([neg, ehs]),
            has_uncond=True,
            encoder_attention_mask=ops.cat([neg_mask, mask]),
            resolution=both(resolution),
            aspect_ratio=both(aspect),
        )


@register_family
class UNetOnly(Family):
    """A bare UNet (an ``arch:`` architecture, a UNet folder): plans, costs and per-graph benchmarks, no images."""

    name = "unet"
    generates = False

    def matches(self, model) -> bool:
        return model.pipeline is None

    def bundle_info(self, model) -> dict[str, Any]:
        return {}
