"""nox sessions: tests, lint, demo, bench. Each builds its own virtualenv with the pinned versions.

nox -s tests      # the test suite (what CI runs, via .ci/run)
nox -s slow       # the tests marked slow, which the default run leaves out
nox -s lint       # ruff check + format check
nox -s demo       # the main job: baseline vs postdiff on the default model
nox -s bench      # the torch CPU and ONNX Runtime benchmarks of benchmarks/ (slow: tens of minutes)
nox -s runtime    # the ONNX runtime without PyTorch: a venv with postdiff-core and postdiff-onnx only (CI runs it)
nox -s docs       # the documentation site (docs/, mkdocs.yml), built with --strict: a warning fails (CI runs it)
"""

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
PACKAGES = [
    "-e",
    "packages/postdiff-core[torch]",
    "-e",
    "packages/postdiff-lab",
    "-e",
    "packages/postdiff-onnx[export]",
    "-e",
    "packages/postdiff-openvino",
    "-e",
    "apps/cli",
]


def install(session: nox.Session, *extra: str) -> None:
    session.install("-c", "constraints.txt", "torch", *PACKAGES, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    install(session, "pytest", "-e", "packages/postdiff-coreml[export]")
    session.install("--no-deps", "DeepCache==0.1.1")  # the parity test's reference (see scripts/setup.sh)
    session.run("pytest", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """The tests the default run leaves out (marked slow): the same checks on more families and schedulers."""
    install(session, "pytest", "-e", "packages/postdiff-coreml[export]")
    session.install("--no-deps", "DeepCache==0.1.1")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """The site: MkDocs Material, the API from the docstrings (mkdocstrings), the CLI reference from the parsers.
    Built in the environment nox runs from (scripts/setup.sh's .venv has PostDiff and the docs tools): the CLI
    reference imports every backend's parser, and a second full install only for the docs would double CI's setup."""
    import sys

    session.run(sys.executable, "-m", "mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"}, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-c", "constraints.txt", "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    install(session)
    session.run("postdiff", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    install(session)
    session.run("python", "benchmarks/bench_torch_cpu.py", *session.posargs)
    session.run("python", "benchmarks/bench_onnx_cpu.py")
    session.run(
        "python",
        "benchmarks/bench_onnx_cpu.py",
        "--model",
        "reference",
        "--images",
        "100",
        "--out",
        "benchmarks/results/onnx_cpu_reference.json",
    )


@nox.session
def runtime(session: nox.Session) -> None:
    """A bundle exported in the main venv (.venv, made by scripts/setup.sh), run in a venv that has only the runtime:
    postdiff-core and postdiff-onnx without extras (no PyTorch, diffusers or transformers). The tests there check
    that, the install size, the images against the main venv's PyTorch-backed run of the bundle, and the command."""
    main = Path(".venv/bin")
    if not (main / "postdiff").exists():
        session.error("the main venv is missing: run bash scripts/setup.sh first (it exports the bundle this session runs)")
    work = Path(session.create_tmp()).resolve()
    bundle, reference = work / "reference-postdiff", work / "reference-images.npz"
    quantized = []  # every other weight type, on a two-graph plan (the main suite tests the quantized graphs themselves)
    # the main suite checks every exported graph against PyTorch; here the bundles only need to exist. The fp32 bundle
    # samples with DPM++ 2M Karras (the scheduler most SD users run), which the runtime must do in numpy
    for folder, plan, weights in [(bundle, "postdiff", "fp32"), *((work / f"reference-{w}", "deepcache", w) for w in ("int8", "int4"))]:
        export = ["export", "onnx", "--model", "reference", "--plan", plan, "--weights", weights, "-o", str(folder), "--overwrite"]
        export += ["--no-verify", *(["--scheduler", "dpmpp-2m-karras"] if folder == bundle else [])]
        session.run(str(main / "postdiff"), *export, external=True)
        images = reference if folder == bundle else folder.with_suffix(".npz")
        script = "packages/postdiff-onnx/runtime_tests/reference_images.py"
        session.run(str(main / "python"), script, str(folder), str(images), external=True)
        if folder != bundle:
            quantized.append(f"{folder}={images}")
    session.install("-c", "constraints.txt", "./packages/postdiff-core", "./packages/postdiff-onnx", "pytest")
    env = {
        "POSTDIFF_RUNTIME_BUNDLE": str(bundle),
        "POSTDIFF_RUNTIME_REFERENCE": str(reference),
        "POSTDIFF_RUNTIME_QUANTIZED": ",".join(quantized),
    }
    session.run("pytest", "-q", "-s", "--noconftest", "-p", "no:cacheprovider", "packages/postdiff-onnx/runtime_tests", env=env)
