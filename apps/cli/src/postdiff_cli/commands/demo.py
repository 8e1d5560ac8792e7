"""``postdiff demo``: the main job. Baseline, the paper's plan and the searched plan side by side, with speed,
paired fidelity and, on the embedded models, class accuracy and FID."""

from __future__ import annotations

from pathlib import Path

from ..common import make_source, model_args, ran_on, recipe, torch_args, warn
from ..render import print_table


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="the main job: baseline and postdiff side by side on the default model")
    model_args(d)
    torch_args(d)
    d.add_argument(
        "--plans",
        default=None,
        help="comma-separated plans (default: baseline, postdiff and, for the embedded models, the plan that "
        "`postdiff plan search --budget 0.4` chose for them)",
    )
    d.add_argument(
        "--seeds", type=int, default=None, help="images per plan (default: 100 for the embedded models, 10 classes in turn; 10 otherwise)"
    )
    d.add_argument("-o", "--output", default="postdiff-demo.png", help="grid image to write")


def _demo_plans(args, model) -> list[tuple[str, str]]:
    """(plan, row label) for --plans, or baseline, postdiff and the plan the 0.4-budget search chose for an
    embedded model (shipped beside its weights as search-0.4.recipe.json by ``postdiff plan search --budget 0.4 -o``)."""
    from postdiff.plan.recipe import display_name

    searched = None
    if args.plans is not None:
        names = [n.strip() for n in args.plans.split(",") if n.strip()]
    else:
        names = ["baseline", "postdiff"]
        from postdiff_lab.builtin_models import reference_weights_dir

        shipped = reference_weights_dir(model.name)
        if shipped is not None:
            searched = str(shipped / "search-0.4.recipe.json")
            if Path(searched).is_file():
                names.append(searched)
    if "baseline" not in names:
        names.insert(0, "baseline")
    out = []
    for name in names:
        label = display_name(name, recipe(name, None))  # an unknown plan fails before any generation
        out.append((name, f"{label} (0.4 search)" if name == searched else label))
    return out


def run(args) -> int:
    from postdiff.errors import PostDiffError
    from postdiff_lab.evaluation import distribution_metrics, paired_fidelity
    from postdiff_lab.images import save_grid

    if args.seeds is not None and args.seeds < 1:
        raise PostDiffError(f"--seeds must be at least 1, got {args.seeds}")
    source = make_source(args)
    model = source.model
    plans = _demo_plans(args, model)
    seeds = args.seeds if args.seeds is not None else (100 if model.dataset else 10)
    test_features = None  # FID needs the test set, and enough samples for a full-rank covariance of 128-d features
    from postdiff_lab import data

    if model.dataset and seeds >= 100 and data.have(model.dataset):
        from postdiff_lab.reference.classifier import test_set_features

        test_features = test_set_features(model.dataset)
    source.generate(recipe("baseline", 2), 1, 0)  # warm-up: the first plan measured pays no one-off costs
    rows, table, ref = [], [], None
    for name, label in plans:
        plan = source.compile(name, args.steps)
        warn(model.untrained_warning(plan))
        ratio = source.macs_ratio(plan)
        batch = source.generate(plan.recipe, seeds, 0)
        if ref is None:
            ref = batch
        fidelity = paired_fidelity(batch.images, ref.images)
        base = batch is ref
        row = [
            label,
            f"{ratio:.3f}",
            f"{batch.seconds:.2f}",
            f"{ref.seconds / batch.seconds:.2f}x",
            "identical" if base else f"{fidelity['psnr']:.1f}",
            "0" if base else f"{fidelity['lpips']:.3f}",
        ]
        if test_features is not None:  # classified once: accuracy and FID from the same features
            metrics = distribution_metrics(batch, model.dataset, test_features)
            row += [f"{metrics['class_accuracy']:.0%}", f"{metrics['fid_classifier']:.1f}"]
        elif model.dataset:
            from postdiff_lab.reference.classifier import classify_samples

            pred = classify_samples(batch.images, model.dataset)[0]
            row.append(f"{(pred == batch.conditions).mean():.0%}")
        table.append(row)
        rows.append(batch.images[:10])
    path = save_grid(rows, args.output, row_labels=[r[0] for r in table], scale=max(1, 64 // rows[0][0].shape[0]))
    print(
        f"PostDiff demo on {model.name} ({seeds} images per plan, {plan.recipe.steps} steps, {plan.scheduler}, {ran_on(model.placement)})"
    )
    headers = ["plan", "MACs vs baseline", "seconds", "speedup", "PSNR vs baseline (dB)", "LPIPS vs baseline"]
    if model.dataset:
        headers.append("class accuracy")
        if test_features is not None:
            headers.append(f"FID (clf, N={seeds})")
    print_table(headers, table)
    print(f"wrote {path} (the first 10 images of each plan)")
    if model.dataset:
        print(
            "note: PSNR/LPIPS against the baseline image of the same seed; class accuracy and FID by the in-domain "
            f"classifier; {f'FID at N={seeds} is biased upwards' if test_features is not None else 'FID needs the test set and --seeds 100 or more'}: "
            "docs/evaluation.md has N=2,000"
        )
    if model.weights == "random":
        print("note: the model has random weights: speed and cost are real, the pictures are not meaningful")
    return 0
