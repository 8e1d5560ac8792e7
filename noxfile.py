"""nox sessions: tests, lint, demo, bench. Each builds its own virtualenv with the pinned versions.

nox -s tests      # the test suite (what CI runs, via .ci/run)
nox -s lint       # ruff check + format check
nox -s demo       # the main job: baseline vs postdiff on the default model
nox -s bench      # the torch CPU and ONNX Runtime benchmarks of benchmarks/ (slow: tens of minutes)
"""

import nox

nox.options.sessions = ["tests", "lint"]
PACKAGES = ["-e", "packages/postdiff-core", "-e", "packages/postdiff-lab", "-e", "packages/postdiff-onnx", "-e", "apps/cli"]


def install(session: nox.Session, *extra: str) -> None:
    session.install("-c", "constraints.txt", "torch", *PACKAGES, *extra)


@nox.session
def tests(session: nox.Session) -> None:
    install(session, "pytest", "-e", "packages/postdiff-coreml")
    session.install("--no-deps", "DeepCache==0.1.1")  # the parity test's reference (see scripts/setup.sh)
    session.run("pytest", *session.posargs)


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
