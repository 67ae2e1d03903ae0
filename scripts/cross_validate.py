"""Cross-validation over the labelled exams: the one way bundled models are chosen.

    python scripts/cross_validate.py folds --data ../shared/data/brats2018/train
    python scripts/cross_validate.py train --data ../shared/data/brats2018/train \\
        --recipe 2d-base [--folds 0,1,2,3,4] -- --dims 2 --steps 2000
    python scripts/cross_validate.py report [--recipes 2d-base,...]
    python scripts/cross_validate.py postprocess --recipe 2d-base
    python scripts/cross_validate.py views --recipe 2d-base
    python scripts/cross_validate.py ensemble --recipes 2d-base,2d-bn

The exams are split into 5 folds stratified by site (BraTS 2013, CBICA, TCIA) and grade (the
TCIA10/TCIA13 exams are the lower-grade ones): each stratum is dealt round the folds in turn,
so every fold holds CBICA and TCIA exams, lower-grade ones where there are enough, and the 3
BraTS 2013 exams fall in 3 of the 5 folds. `train` trains one model per fold with
`train_bundled.py` (everything after ``--`` is passed to it), holding the fold's exams out;
the fold model is validated on them (Dice and HD95, with and without t1ce) when its training
ends. A fold whose model exists is skipped and an interrupted one resumes from its checkpoint,
so running the same command again goes on where it stopped; `--rescore` runs finished folds
again for their scores alone, after a change of an inference setting. `report` writes every recipe's
per-fold and mean figures into docs/MODELS.md (between the cross-validation markers) and
prints them. `postprocess` scores post-processing candidates (keep the largest tumour, remove
small islands) on the finished folds' held-out exams, and says which the rule keeps; `views`
does the same for a 2D recipe run over coronal and sagittal slices as well as axial ones, and
`ensemble` for the mean of several recipes' fold models against each recipe alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bundled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CV_DIR = ROOT / "runs" / "cv"
N_FOLDS = 5
REGIONS = ("WT", "TC", "ET")
LOWER_GRADE = ("TCIA10_", "TCIA13_")
BEGIN, END = "<!-- cross-validation: begin -->", "<!-- cross-validation: end -->"


def stratum(name: str) -> str:
    """The site and grade an exam's BraTS 2018 name says."""
    if any(tag in name for tag in LOWER_GRADE):
        return "TCIA lower-grade"
    for site in ("2013", "CBICA", "TCIA"):
        if f"_{site}" in name:
            return site
    return "other"


def make_folds(names: list[str], n_folds: int = N_FOLDS) -> list[list[str]]:
    """Deal each stratum (rarest first, names sorted) round the folds, carrying on where the
    previous stratum stopped, so that folds differ in size by one at most."""
    strata: dict[str, list[str]] = {}
    for name in sorted(names):
        strata.setdefault(stratum(name), []).append(name)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    turn = 0
    for key in sorted(strata, key=lambda k: (len(strata[k]), k)):
        for name in strata[key]:
            folds[turn % n_folds].append(name)
            turn += 1
    return [sorted(f) for f in folds]


def exam_names(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*seg.nii*")))


def fold_dir(recipe: str, fold: int) -> Path:
    return CV_DIR / recipe / f"fold{fold}"


def _not_rescorable(state_path: Path) -> str | None:
    """Why a finished fold cannot be run again for its scores alone (None: it can): without
    its checkpoint at the step budget, the run would train on."""
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return f"its checkpoint {state_path} cannot be read"
    budget = (state.get("config") or {}).get("steps")
    if budget is None or state.get("step", 0) < budget:
        return f"its checkpoint {state_path} is not at a step budget (step {state.get('step')})"
    return None


def train(args: argparse.Namespace, extra: list[str]) -> int:
    folds = make_folds(exam_names(args.data))
    wanted = [int(f) for f in args.folds.split(",")] if args.folds else range(len(folds))
    for k in wanted:
        out = fold_dir(args.recipe, k) / "model"
        if (out / "card.json").is_file():
            if not args.rescore:
                print(f"fold {k}: done ({out})", flush=True)
                continue
            problem = _not_rescorable(fold_dir(args.recipe, k) / "run" / "state.json")
            if problem:
                print(f"fold {k}: cannot be scored again: {problem}", file=sys.stderr)
                return 2
            # Labels cached by `predictions` came from the old settings.
            shutil.rmtree(fold_dir(args.recipe, k) / "labels", ignore_errors=True)
        print(f"fold {k}: validation {folds[k]}", flush=True)
        code = train_bundled.main(
            [
                "--data", str(args.data),
                "--validation", ",".join(folds[k]),
                "--out", str(out),
                "--run-dir", str(fold_dir(args.recipe, k) / "run"),
                *extra,
            ]
        )  # fmt: skip
        if code:
            return code
    return 0


def fold_metrics(recipe: str) -> list[dict]:
    """The validation metrics of each finished fold model of ``recipe`` (fold, card)."""
    done = []
    for k in range(N_FOLDS):
        card = fold_dir(recipe, k) / "model" / "card.json"
        if card.is_file():
            done.append({"fold": k, "card": json.loads(card.read_text())})
    return done


def _row(label: str, dice: dict, hd95: dict | None) -> str:
    cells = [f"{dice[r]:.3f}" for r in REGIONS]
    cells += [f"{hd95[r]:.1f}" for r in REGIONS] if hd95 else ["", "", ""]
    return f"| {label} | " + " | ".join(cells) + " |"


def _resumed(done: list[dict]) -> list[str]:
    """A line naming the commands that resumed or re-scored the folds (e.g. a new inference
    setting for a finished run), if any."""
    commands = {}
    for d in done:
        for command in d["card"]["training"].get("resumed_with", []):
            commands.setdefault(command, []).append(str(d["fold"]))
    if not commands:
        return []
    said = "; ".join(f"`{c}` (fold {', '.join(k)})" for c, k in commands.items())
    return ["", f"Resumed or re-scored with: {said}."]


#: Card keys of inference settings: folds scored with different ones are not one recipe.
INFERENCE_SETTINGS = ("context_mm", "views", "patch_size")


def _mixed_settings(done: list[dict]) -> list[str]:
    said = []
    for key in INFERENCE_SETTINGS:
        if len({json.dumps(d["card"].get(key)) for d in done}) > 1:
            by_fold = ", ".join(f"fold {d['fold']}: {d['card'].get(key)}" for d in done)
            said.append(f"`{key}` differs between the folds ({by_fold})")
    return ["", "**Not one recipe yet**: " + "; ".join(said) + "."] if said else []


def recipe_table(recipe: str) -> str:
    """Per-fold and exam-mean Dice and HD95 of one recipe, with all sequences and without t1ce."""
    done = fold_metrics(recipe)
    if not done:
        return f"### {recipe}\n\nno fold finished yet\n"
    card0 = done[0]["card"]["training"]
    lines = [
        f"### {recipe}",
        "",
        f"`{card0['command']}` (one model per fold; {len(done)} of {N_FOLDS} folds finished; "
        f"steps per fold: {', '.join(str(d['card']['training']['steps']) for d in done)}; "
        f"minutes: {', '.join(str(d['card']['training']['minutes']) for d in done)}, wall time "
        "on 2 cores shared with other work -- the steps are fixed, so the minutes say nothing "
        "about the recipe). The fold models' own labels: no post-processing.",
        *_resumed(done),
        *_mixed_settings(done),
        "",
        "| fold (held-out exams) | WT | TC | ET | HD95 WT (mm) | HD95 TC | HD95 ET |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for key, title in (("validation", ""), ("validation_without_t1ce", ", t1ce missing")):
        dice_all, hd_all = {}, {}
        for d in done:
            m = d["card"]["metrics"].get(key)
            if not m:
                continue
            dice_all.update(m["per_exam"])
            hd_all.update(m.get("hd95", {}))
            hd = m.get("mean_hd95")
            lines.append(
                _row(f"fold {d['fold']} ({len(m['per_exam'])} exams){title}", m["mean"], hd)
            )
        mean = {r: float(np.mean([e[r] for e in dice_all.values()])) for r in REGIONS}
        hd_mean = (
            {r: float(np.mean([e[r] for e in hd_all.values()])) for r in REGIONS}
            if len(hd_all) == len(dice_all)
            else None
        )
        lines.append(_row(f"**mean over {len(dice_all)} exams{title}**", mean, hd_mean))
        summary[key] = mean
    test = [d["card"]["metrics"].get("test_sample", {}).get("mean") for d in done]
    test = [t for t in test if t]
    if test:
        shown = ", ".join("/".join(f"{t[r]:.3f}" for r in REGIONS) for t in test)
        lines += [
            "",
            f"Outside check, the sample exam (never used to choose), per fold model: {shown}.",
        ]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> int:
    recipes = (
        args.recipes.split(",")
        if args.recipes
        else sorted(p.name for p in CV_DIR.iterdir() if p.is_dir())
        if CV_DIR.is_dir()
        else []
    )
    folds = make_folds(exam_names(args.data))
    text = [
        BEGIN,
        "## Cross-validation",
        "",
        f"{N_FOLDS} folds over the {sum(map(len, folds))} exams of `{args.data.name}`, "
        "stratified by site and grade (`python scripts/cross_validate.py folds --data "
        "../shared/data/brats2018/train`):",
        "",
        *(f"- fold {k}: {', '.join(f)}" for k, f in enumerate(folds)),
        "",
        "Dice and HD95 of the full inference pipeline on each held-out exam's 1 mm grid; the "
        "mean is over exams (every exam is held out once). HD95 where a region is missed or "
        "invented outright counts as 373.13 mm, the BraTS evaluation's convention. Rebuild "
        "with `python scripts/cross_validate.py report --data ../shared/data/brats2018/train`.",
        "",
        *(recipe_table(r) for r in recipes),
        END,
    ]
    section = "\n".join(text[1:-1])
    print(section)
    _write_between(BEGIN, END, section)
    return 0


def _dice_hd95(found: dict) -> dict[str, tuple[float, float]]:
    """Region -> (Dice, HD95) of `evaluate_labels`, a miss's HD95 capped as BraTS scores it."""
    from evaluate_models import HD95_OF_A_MISS

    return {r: (s["dice"], min(s["hd95_mm"], HD95_OF_A_MISS)) for r, s in found.items()}


def with_bundled_rules(model):
    """A fold model labelled as the product would label it: the post-processing of the
    bundled model of its kind (its card's ``postprocess``), which no fold model carries."""
    from napari_tumorseg.core.models import bundled_dir

    card = json.loads((bundled_dir() / model.card["name"] / "card.json").read_text())
    model.card["postprocess"] = card.get("postprocess")
    return model


def choice_table(title: str, command: str, scores: dict, fold_of: dict[str, int]) -> str:
    """The table of ``scores`` (candidate -> exam -> region -> (Dice, HD95)), the first
    candidate the baseline, and which candidates the rule keeps: the mean Dice over exams rises
    and no fold's mean WT Dice falls by more than `FOLD_NOISE`."""
    base = scores[next(iter(scores))]
    done = sorted(set(fold_of.values()))
    lines = [
        title,
        "",
        f"{command}: each candidate "
        f"on the held-out exams of folds {', '.join(map(str, done))} ({len(fold_of)} exams); "
        f"kept only if the mean over exams rises and no fold's mean WT Dice falls by more "
        f"than {FOLD_NOISE}.",
        "",
        "| candidate | WT | TC | ET | HD95 WT (mm) | HD95 TC | HD95 ET | worst fold, WT Dice "
        "change | exams losing > 0.01 WT | kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best: tuple[float, str] | None = None  # the kept candidate with the best mean WT
    for candidate, table in scores.items():
        dice = {r: np.mean([e[r][0] for e in table.values()]) for r in REGIONS}
        hd = {r: np.mean([e[r][1] for e in table.values()]) for r in REGIONS}
        worst = min(
            np.mean([table[n]["WT"][0] - base[n]["WT"][0] for n in fold_of if fold_of[n] == k])
            for k in done
        )
        rises = np.mean(list(dice.values())) > np.mean(
            [np.mean([e[r][0] for e in base.values()]) for r in REGIONS]
        )
        kept = "-" if table is base else ("yes" if rises and worst >= -FOLD_NOISE else "no")
        losers = [n for n in table if table[n]["WT"][0] < base[n]["WT"][0] - FOLD_NOISE]
        if kept == "yes" and (best is None or dice["WT"] > best[0]):
            best = (dice["WT"], candidate)
        lines.append(
            f"| {candidate} | "
            + " | ".join(f"{dice[r]:.3f}" for r in REGIONS)
            + " | "
            + " | ".join(f"{hd[r]:.1f}" for r in REGIONS)
            + f" | {worst:+.3f} | {', '.join(losers) or 'none'} | {kept} |"
        )
    if len(done) < N_FOLDS:
        verdict = f"Folds {', '.join(map(str, done))} of {N_FOLDS}: the choice waits for all five."
    elif best is None:
        verdict = f"All five folds: no candidate is kept; {next(iter(scores))!r} stays."
    else:
        verdict = (
            f"All five folds: of the kept candidates, the best mean WT Dice is "
            f"{best[1]!r} ({best[0]:.3f})."
        )
    lines += ["", verdict]
    return "\n".join(lines)


#: Post-processing candidates for `postprocess`: name -> labels, voxel mL -> labels.
def _candidates():
    from napari_tumorseg.core.postprocess import (
        keep_largest_component,
        remove_minor_tumours,
        remove_small_islands,
    )

    return {
        "none (the model's labels)": lambda labels, ml: labels,
        "keep the largest tumour": lambda labels, ml: keep_largest_component(labels),
        **{
            f"remove islands under {size:g} mL": (
                lambda labels, ml, size=size: remove_small_islands(labels, size, ml)
            )
            for size in (0.5, 2.0, 5.0)
        },
        # Multifocal tumours keep their other large foci.
        **{
            f"remove pieces under {share:.0%} of the largest": (
                lambda labels, ml, share=share: remove_minor_tumours(labels, share)
            )
            for share in (0.1, 0.25)
        },
    }


#: A candidate is kept only if no fold's mean WT Dice falls by more than this.
FOLD_NOISE = 0.01


def predictions(recipe: str, k: int, exams: list[str], data: Path) -> dict[str, tuple]:
    """Each held-out exam's labels from fold ``k``'s model (cached beside the model, so that
    the candidates are scored without running the network again), with its reference."""
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.models import load_model_folder

    cache = fold_dir(recipe, k) / "labels"
    cache.mkdir(exist_ok=True)
    model = None
    out = {}
    for name in exams:
        exam = read_exam(data / name)
        path = cache / f"{name}.npy"
        if not path.is_file():
            model = model or load_model_folder(fold_dir(recipe, k) / "model")
            labels = run_to_end(segment(exam, model, device="cpu")).labels.array
            np.save(path, labels)
            print(f"  fold {k}: {name} segmented", flush=True)
        out[name] = (np.load(path), exam.labels.array, exam.reference)
    return out


def postprocess(args: argparse.Namespace) -> int:
    """Score each post-processing candidate on every finished fold's held-out exams."""
    from napari_tumorseg.core.metrics import evaluate_labels

    folds = make_folds(exam_names(args.data))
    candidates = _candidates()
    scores: dict[str, dict[str, dict]] = {c: {} for c in candidates}  # candidate -> exam -> ..
    fold_of: dict[str, int] = {}
    for k, exams in enumerate(folds):
        if not (fold_dir(args.recipe, k) / "model" / "card.json").is_file():
            continue
        for name, (labels, reference, grid) in predictions(
            args.recipe, k, exams, args.data
        ).items():
            fold_of[name] = k
            for candidate, apply in candidates.items():
                found = evaluate_labels(
                    apply(labels, grid.voxel_volume_ml), reference, grid.spacing
                )
                scores[candidate][name] = _dice_hd95(found)
    if not fold_of:
        print(f"no finished fold of {args.recipe}")
        return 1
    table = choice_table(
        f"### Post-processing, {args.recipe}",
        f"`python scripts/cross_validate.py postprocess --recipe {args.recipe}`",
        scores,
        fold_of,
    )
    _publish(f"postprocess {args.recipe}", table)
    return 0


def _publish(
    key: str, table: str, seconds: dict[str, list[float]] | None = None, timed: str = ""
) -> None:
    """Print a `choice_table` (with each candidate's mean ``seconds`` per exam, timed as
    ``timed`` says) and put it between the ``<!-- key: begin/end -->`` markers of
    docs/MODELS.md."""
    if seconds is not None:
        table += f"\n\nSeconds per exam ({timed}, 2 CPU threads): " + ", ".join(
            f"{c} {np.mean(t):.1f}" for c, t in seconds.items()
        )
    print(table)
    _write_between(f"<!-- {key}: begin -->", f"<!-- {key}: end -->", table)


def _write_between(begin: str, end: str, section: str) -> None:
    """Put ``section`` between the ``begin`` and ``end`` markers of docs/MODELS.md (appended
    with them when they are not there)."""
    models_md = ROOT / "docs" / "MODELS.md"
    doc = models_md.read_text()
    block = f"{begin}\n{section}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    models_md.write_text(doc)


#: The views `views` runs, in order: its candidates are the first one, the first two, ...
VIEW_ORDER = ("axial", "coronal", "sagittal")


def view_candidates(views: tuple[str, ...] = VIEW_ORDER) -> dict[str, tuple[str, ...]]:
    """Candidate name -> views: the axial slices alone (the cards'), then each further view of
    ``views`` added in turn."""
    return {
        (" + ".join(views[:n]) + (" (the card's)" if n == 1 else "")): views[:n]
        for n in range(1, len(views) + 1)
    }


def views(args: argparse.Namespace) -> int:
    """Score a 2D recipe's fold models over more views than the axial slices, labelled with the
    bundled model's post-processing (its card's rules), on every finished fold's held-out
    exams."""
    from napari_tumorseg.core.models import load_model_folder

    names = [v for v in args.views.split(",") if v]
    if not names or names[0] != "axial" or any(v not in VIEW_ORDER for v in names):
        print(f"--views: axial first, then some of {', '.join(VIEW_ORDER[1:])}")
        return 1

    def parts(k: int):
        folder = fold_dir(args.recipe, k) / "model"
        if not (folder / "card.json").is_file():
            return None
        model = with_bundled_rules(load_model_folder(folder))
        if model.card["spatial_dims"] != 2:
            raise SystemExit(f"{args.recipe} is not a 2D recipe")
        return [(model, (view,)) for view in names]

    candidates = {
        c: list(range(len(chosen))) for c, chosen in view_candidates(tuple(names)).items()
    }
    return _score_means(
        args.data,
        parts,
        candidates,
        f"### Views, {args.recipe}",
        f"`python scripts/cross_validate.py views --recipe {args.recipe}"
        + ("" if tuple(names) == VIEW_ORDER else f" --views {','.join(names)}")
        + "` (labels with the "
        "bundled 2D card's post-processing)",
        f"views {args.recipe}",
        "`segment` over each view, summed",
        f"no finished fold of {args.recipe}",
    )


def ensemble(args: argparse.Namespace) -> int:
    """Score the mean of several recipes' fold models (the probabilities of each fold's models
    averaged, labelled with the bundled model's post-processing) against each recipe alone, on
    the held-out exams of the folds that every recipe has finished."""
    from napari_tumorseg.core.models import load_model_folder

    recipes = [r for r in args.recipes.split(",") if r]
    if len(recipes) < 2:
        print("an ensemble needs two recipes or more, e.g. --recipes 2d-base,2d-bn")
        return 1

    def parts(k: int):
        folders = [fold_dir(r, k) / "model" for r in recipes]
        if not all((f / "card.json").is_file() for f in folders):
            return None
        return [(with_bundled_rules(load_model_folder(f)), None) for f in folders]

    candidates = {r: [i] for i, r in enumerate(recipes)}
    candidates[f"mean of {' and '.join(recipes)}"] = list(range(len(recipes)))
    return _score_means(
        args.data,
        parts,
        candidates,
        f"### Ensemble, {' + '.join(recipes)}",
        f"`python scripts/cross_validate.py ensemble --recipes {','.join(recipes)}` (labels with "
        "the bundled card's post-processing)",
        f"ensemble {'+'.join(recipes)}",
        "`segment` of each member, summed",
        f"no fold that {', '.join(recipes)} have all finished",
    )


def _score_means(
    data: Path,
    parts,
    candidates: dict[str, list[int]],
    title: str,
    command: str,
    key: str,
    timed: str,
    nothing: str,
) -> int:
    """Each candidate -- the mean of some parts' probabilities, labelled with the first part's
    card rules -- scored on every fold's held-out exams where ``parts(k)`` gives the fold's
    parts (``(model, views)`` pairs, each run once per exam); the `choice_table` published
    under ``key`` (a candidate's seconds are its parts'). Prints ``nothing`` and returns 1 when
    no fold has its parts."""
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.labels import card_labels
    from napari_tumorseg.core.metrics import evaluate_labels

    scores: dict[str, dict[str, dict]] = {c: {} for c in candidates}
    seconds: dict[str, list[float]] = {c: [] for c in candidates}
    fold_of: dict[str, int] = {}
    for k, exams in enumerate(make_folds(exam_names(data))):
        fold_parts = parts(k)
        if fold_parts is None:
            continue
        rules = fold_parts[0][0].card.get("postprocess")
        for name in exams:
            exam = read_exam(data / name)
            fold_of[name] = k
            grid = exam.reference
            results = [
                run_to_end(segment(exam, model, device="cpu", postprocess=False, views=views))
                for model, views in fold_parts
            ]
            for candidate, chosen in candidates.items():
                mean = np.mean([results[i].probabilities.array for i in chosen], axis=0)
                labels = card_labels(mean, rules, grid.voxel_volume_ml)
                found = evaluate_labels(labels, exam.labels.array, grid.spacing)
                scores[candidate][name] = _dice_hd95(found)
                seconds[candidate].append(sum(results[i].seconds for i in chosen))
                print(f"  fold {k}: {name}, {candidate}: WT {found['WT']['dice']:.3f}", flush=True)
    if not fold_of:
        print(nothing)
        return 1
    _publish(key, choice_table(title, command, scores, fold_of), seconds, timed)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("folds", "train", "report", "postprocess", "views", "ensemble"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/brats2018/train")
        if name in ("train", "postprocess", "views"):
            p.add_argument("--recipe", required=True, help="name of the recipe (its folder)")
        if name == "views":
            p.add_argument(
                "--views",
                default=",".join(VIEW_ORDER),
                help="the views to run, axial first: the candidates add them in this order",
            )
        if name == "train":
            p.add_argument("--folds", default="", help="e.g. 0,1 (default: all)")
            p.add_argument(
                "--rescore",
                action="store_true",
                help="run finished folds again: no more steps (their checkpoints are at the "
                "step budget), scored again with changed inference settings (e.g. --context-mm)",
            )
        if name == "report":
            p.add_argument("--recipes", default="", help="default: every recipe under runs/cv")
        if name == "ensemble":
            p.add_argument("--recipes", required=True, help="two or more, e.g. 2d-base,2d-bn")
    args = parser.parse_args(argv)
    if args.command == "folds":
        for k, fold in enumerate(make_folds(exam_names(args.data))):
            print(f"fold {k}: {', '.join(f'{n} ({stratum(n)})' for n in fold)}")
        return 0
    if args.command == "train":
        return train(args, extra)
    if args.command == "postprocess":
        return postprocess(args)
    if args.command == "views":
        return views(args)
    if args.command == "ensemble":
        return ensemble(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
