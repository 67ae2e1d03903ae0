"""Cross-validation over the labelled exams: the one way bundled models are chosen.

    python scripts/cross_validate.py folds --data ../shared/data/brats2018/train
    python scripts/cross_validate.py train --data ../shared/data/brats2018/train \\
        --recipe 2d-base [--folds 0,1,2,3,4] -- --dims 2 --steps 2000
    python scripts/cross_validate.py report [--recipes 2d-base,...]

The exams are split into 5 folds stratified by site (BraTS 2013, CBICA, TCIA) and grade (the
TCIA10/TCIA13 exams are the lower-grade ones): each stratum is dealt round the folds in turn,
so every fold holds CBICA and TCIA exams, lower-grade ones where there are enough, and the 3
BraTS 2013 exams fall in 3 of the 5 folds. `train` trains one model per fold with
`train_bundled.py` (everything after ``--`` is passed to it), holding the fold's exams out;
the fold model is validated on them (Dice and HD95, with and without t1ce) when its training
ends. A fold whose model exists is skipped and an interrupted one resumes from its checkpoint,
so running the same command again goes on where it stopped. `report` writes every recipe's
per-fold and mean figures into docs/MODELS.md (between the cross-validation markers) and
prints them.
"""

from __future__ import annotations

import argparse
import json
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


def train(args: argparse.Namespace, extra: list[str]) -> int:
    folds = make_folds(exam_names(args.data))
    wanted = [int(f) for f in args.folds.split(",")] if args.folds else range(len(folds))
    for k in wanted:
        out = fold_dir(args.recipe, k) / "model"
        if (out / "card.json").is_file():
            print(f"fold {k}: done ({out})", flush=True)
            continue
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
    section = "\n".join(text)
    print(section)
    models_md = ROOT / "docs" / "MODELS.md"
    doc = models_md.read_text()
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + section + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section + "\n"
    models_md.write_text(doc)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("folds", "train", "report"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/brats2018/train")
        if name == "train":
            p.add_argument("--recipe", required=True, help="name of the recipe (its folder)")
            p.add_argument("--folds", default="", help="e.g. 0,1 (default: all)")
        if name == "report":
            p.add_argument("--recipes", default="", help="default: every recipe under runs/cv")
    args = parser.parse_args(argv)
    if args.command == "folds":
        for k, fold in enumerate(make_folds(exam_names(args.data))):
            print(f"fold {k}: {', '.join(f'{n} ({stratum(n)})' for n in fold)}")
        return 0
    if args.command == "train":
        return train(args, extra)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
