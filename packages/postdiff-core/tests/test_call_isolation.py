"""A plan belongs to its call: other threads, other pipelines sharing the network (``from_pipe``), and a pipeline
called from inside a step callback run exactly as they would without PostDiff, under every built-in plan.

The interleaving is forced, not hoped for: thread A's plan call stops inside its first UNet step (in the middle of
the network, while its cross-attention capture is active) until thread B has run a whole call on the same modules.
"""

import inspect
import threading

import numpy as np
import pytest
from core_helpers import gen
from diffusers.callbacks import PipelineCallback

import postdiff
from postdiff.plan.recipe import BUILTIN_PLANS
from postdiff_lab.toy import toy_pipeline

# the toy pipeline each built-in plan is made for
KIND = {"postdiff-xl": "sdxl", "postdiff-dit": "pixart-sigma", "postdiff-lcm": "lcm", "postdiff-sd3": "sd3", "postdiff-sana": "sana"}
NO_TOY = {"postdiff-flux"}  # FLUX: costs and plans only (arch:flux-dev), no pipeline runs it yet
# by default one plan of each split kind (UNet, DiT, MMDiT) and the baseline; every built-in plan with -m slow
DEFAULT_PLANS = {"baseline", "postdiff", "postdiff-dit", "postdiff-sd3"}
PLANS = [name if name in DEFAULT_PLANS else pytest.param(name, marks=pytest.mark.slow) for name in BUILTIN_PLANS if name not in NO_TOY]


def plan_of(name: str):
    return BUILTIN_PLANS[name]


def run(pipe, prompt: str, seed: int, **kw):
    """One call at the step count of the plan A runs (every pipeline of a test runs the same count)."""
    kw.setdefault("num_inference_steps", STEP_COUNT[0])
    return pipe(prompt, generator=gen(seed), output_type="np", **kw).images


STEP_COUNT = [20]


@pytest.fixture(autouse=True)
def _step_count(request):
    name = request.node.callspec.params.get("name", "postdiff") if hasattr(request.node, "callspec") else "postdiff"
    STEP_COUNT[0] = BUILTIN_PLANS[name].steps
    yield


def shared_pair(name: str):
    """(A, B): two pipelines of the plan's kind sharing every component (B made with ``from_pipe``)."""
    a = toy_pipeline(KIND.get(name, "sd"))  # the kind's own scheduler (LCM's for lcm)
    b = type(a).from_pipe(a)
    assert b.unet is a.unet if hasattr(a, "unet") else b.transformer is a.transformer
    return a, b


def planned_pair(name: str):
    """(A with the plan, B vanilla, B's vanilla image, A's image under the plan), each image made alone."""
    a, b = shared_pair(name)
    vanilla_b = run(b, "a lighthouse", 7)
    postdiff.apply(a, plan_of(name))
    return a, b, vanilla_b, run(a, "a red apple", 3)


def network(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def middle(net):
    return net.mid_block if hasattr(net, "mid_block") else net.transformer_blocks[len(net.transformer_blocks) // 2]


def step_callback(pipe, fn, legacy: bool = False):
    """The keyword arguments that make ``pipe`` call ``fn()`` after its second step: ``callback_on_step_end`` where
    the pipeline takes it (unless ``legacy``), else the older ``callback``."""
    base = getattr(type(pipe), "_postdiff_base", type(pipe))
    if "callback_on_step_end" in inspect.signature(base.__call__).parameters and not legacy:

        def on_step_end(p, i, t, kwargs):
            if i == 1:
                fn()
            return kwargs

        return {"callback_on_step_end": on_step_end}

    def legacy(i, t, latents):
        if i == 1:
            fn()

    return {"callback": legacy, "callback_steps": 1}


@pytest.mark.parametrize("name", PLANS)
def test_another_thread_on_the_shared_network_runs_vanilla(name):
    a, b, vanilla_b, solo_a = planned_pair(name)

    inside, b_done = threading.Event(), threading.Event()
    a_thread: list[threading.Thread] = []

    def hold_a_inside(module, args):
        if threading.current_thread() in a_thread and not inside.is_set():
            inside.set()
            assert b_done.wait(60), "thread B did not finish"

    handle = middle(network(a)).register_forward_pre_hook(hold_a_inside)
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def thread_a():
        try:
            results["a"] = run(a, "a red apple", 3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            b_done.set()

    def thread_b():
        try:
            assert inside.wait(60), "thread A never reached its plan step"
            results["b"] = run(b, "a lighthouse", 7)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            b_done.set()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    a_thread.append(ta)
    try:
        ta.start()
        tb.start()
        ta.join(120)
        tb.join(120)
    finally:
        handle.remove()
    assert not errors, errors
    assert inside.is_set()
    assert np.array_equal(results["b"], vanilla_b)  # B: exactly its vanilla image
    assert np.array_equal(results["a"], solo_a)  # A: exactly its plan's image
    assert not network(a)._diffusers_hook.hooks  # the hook is gone with the last call


@pytest.mark.parametrize("name", PLANS)
def test_a_pipeline_called_from_a_step_callback_runs_vanilla(name):
    a, b, vanilla_b, solo_a = planned_pair(name)
    # SD pipelines also take the older ``callback`` (through their **kwargs): both kinds run outside the plan
    for legacy in (False, True) if name == "postdiff" else (False,):
        inner: list[np.ndarray] = []
        out = run(a, "a red apple", 3, **step_callback(a, lambda inner=inner: inner.append(run(b, "a lighthouse", 7)), legacy))
        assert len(inner) == 1 and np.array_equal(inner[0], vanilla_b)
        assert np.array_equal(out, solo_a)


def test_two_plans_at_once_on_one_network_each_run_their_own():
    a, b = shared_pair("postdiff")
    postdiff.apply(a, plan_of("postdiff"))
    postdiff.apply(b, plan_of("deepcache"))
    solo = {"a": run(a, "a red apple", 3), "b": run(b, "a lighthouse", 7)}
    results: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(2)

    def go(key, pipe, prompt, seed):
        barrier.wait(30)
        for _ in range(3):
            image = run(pipe, prompt, seed)
            assert np.array_equal(image, results.setdefault(key, image))

    threads = [threading.Thread(target=go, args=("a", a, "a red apple", 3)), threading.Thread(target=go, args=("b", b, "a lighthouse", 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert np.array_equal(results["a"], solo["a"]) and np.array_equal(results["b"], solo["b"])
    # a plan call from inside another plan call's callback runs its own plan
    inner: list[np.ndarray] = []
    out = run(a, "a red apple", 3, **step_callback(a, lambda: inner.append(run(b, "a lighthouse", 7))))
    assert np.array_equal(inner[0], solo["b"]) and np.array_equal(out, solo["a"])
    assert not a.unet._diffusers_hook.hooks
    assert not any(type(m.processor).__name__ == "_XAttnProcessor" for m in a.unet.modules() if hasattr(m, "processor"))


def test_pipeline_callback_objects_keep_their_tensor_inputs():
    """A PipelineCallback passed to a plan call still reads the tensors it asks for, and what it calls runs vanilla."""
    a, b = shared_pair("postdiff")
    vanilla_b = run(b, "a lighthouse", 7)
    postdiff.apply(a, plan_of("postdiff"))
    seen: list = []

    class CallB(PipelineCallback):
        tensor_inputs = ["latents", "prompt_embeds"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            if step_index == 1:
                seen.append(run(b, "a lighthouse", 7))
            return callback_kwargs

    run(a, "a red apple", 3, callback_on_step_end=CallB(), callback_on_step_end_tensor_inputs=CallB.tensor_inputs)
    assert seen[0] == ["latents", "prompt_embeds"]
    assert np.array_equal(next(s for s in seen if isinstance(s, np.ndarray)), vanilla_b)


def test_the_call_steps_its_own_scheduler_copy():
    """A plan never changes the scheduler object pipelines share: after a call its state is what it was."""
    a, b = shared_pair("postdiff")
    assert a.scheduler is b.scheduler
    b.scheduler.set_timesteps(9)
    before = b.scheduler.timesteps.clone()
    postdiff.apply(a, plan_of("postdiff"))
    run(a, "a red apple", 3)
    assert a.scheduler is b.scheduler and np.array_equal(b.scheduler.timesteps.numpy(), before.numpy())
