"""The site mode of bench_finetune.py: does "keep for next exams" learn a site?

    python benchmarks/bench_finetune.py --site --fold 1 [--recipe 2d-base] [--seconds 60]
    python benchmarks/bench_finetune.py --site --deployed 2d [--chain-length 4 --chains 3]

A radiologist corrects exam after exam from one scanner park. With a cross-validation fold
model (`scripts/cross_validate.py train`), the fold's held-out CBICA exams -- one site, never
trained on -- are corrected in a chain: the user segments an exam with the newest version,
corrects 3 axial slices through the tumour (the expert labels there, `simulate_user`), and
"keep" makes the next version from it. After each corrected exam, the exams of the chain not
corrected yet are segmented with the newest version (whole exam, WT / TC / ET Dice against the
expert): the change against the fold model is what the site's corrections carried over. After
the last one, the fold's held-out exams of the other sites measure forgetting. Each exam of the
chain is the last one once (the chain rotated), so the figure after n - 1 corrected exams
rests on every exam.

With ``--deployed MODEL`` the model is a bundled or user model taken to a new site instead:
the chains are groups of ``--chain-length`` of the CBICA exams its card's training never saw
(neither trained nor validated on), each group rotated; forgetting is measured on the other
sites' exams it never saw and on the sample exam. The bundled 2D model was trained on 11 exams of
which one came from CBICA, so its CBICA exams are what a radiologist at a new site meets; a fold
model was trained on 12-13 CBICA exams, with little of the site left to learn.

Candidates measured side by side:

- ``keep``: the product's "keep for next exams" (`core.finetune`, the network fine-tuned);
- ``calibration``: a site calibration, not shipped -- per region, logit' = logit +
  a . (WT, TC, ET logits) + b, fitted by L-BFGS on the brain voxels of every corrected slice so
  far (the lineage's corrections), applied with the exam head's rule (no tumour away from the
  network's) -- the smallest "site head" there is.

The fold model's labels get the bundled model's post-processing (its card's rules), as the
product's would.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from cross_validate import (  # noqa: E402
    exam_names,
    fold_dir,
    make_folds,
    stratum,
    with_bundled_rules,
)

REGIONS = ("WT", "TC", "ET")
SITE = "CBICA"
#: The sample exam's name (a TCIA exam, never trained on).
SAMPLE = "Brats18_TCIA01_378_1"
CANDIDATES = ("keep", "calibration")


def rotations(exams: list[str]) -> list[list[str]]:
    """Every rotation of ``exams``: each one ends a chain once."""
    return [exams[i:] + exams[:i] for i in range(len(exams))]


class SiteBench:
    """A model, the exams of its chains and of the other sites, and the helpers of the chains.

    ``exams``: name -> case folder; ``chains``: lists of names, each corrected in turn;
    ``others``: the names forgetting is measured on."""

    def __init__(
        self, model, described: str, exams: dict, chains: list, others: list, threads: int
    ) -> None:
        import torch

        from napari_tumorseg.core.io import read_exam

        torch.set_num_threads(threads)
        self.model, self.described = model, described
        self.exams = {name: read_exam(folder) for name, folder in exams.items()}
        self.chains, self.others = chains, others
        self.site = sorted({n for chain in chains for n in chain})
        self.results = {name: self.segment(self.model, name) for name in self.exams}
        self.base = {name: result.labels.array for name, result in self.results.items()}
        self.base_dice = {name: self.dice(self.base[name], name) for name in self.exams}

    @classmethod
    def of_fold(cls, recipe: str, fold: int, data: Path, threads: int) -> SiteBench:
        """A cross-validation fold model; chains: its held-out CBICA exams, each rotation."""
        from napari_tumorseg.core.models import load_model_folder

        folder = fold_dir(recipe, fold) / "model"
        if not (folder / "card.json").is_file():
            raise SystemExit(
                f"no model for fold {fold} of {recipe} ({folder}): train it first with "
                f"scripts/cross_validate.py train --recipe {recipe}"
            )
        model = with_bundled_rules(load_model_folder(folder))
        names = make_folds(exam_names(data))[fold]  # the folds the models were trained on
        site = [n for n in names if stratum(n) == SITE]
        if len(site) < 2:
            raise SystemExit(f"fold {fold} holds {len(site)} {SITE} exam(s): no chain")
        return cls(
            model,
            f"Fold {fold}'s model ({recipe}, never trained on these exams)",
            {n: data / n for n in names},
            rotations(site),
            [n for n in names if stratum(n) != SITE],
            threads,
        )

    @classmethod
    def of_deployed(cls, name: str, data: Path, threads: int, length: int, count: int) -> SiteBench:
        """A bundled or user model at a new site: ``count`` groups of ``length`` of the CBICA
        exams its training never saw, each rotated; the others: the other sites' unseen exams
        and the sample exam."""
        from napari_tumorseg.core.models import load_model

        model = load_model(name)
        training = model.card.get("training") or {}
        seen = {*training.get("train_exams", ()), *training.get("validation_exams", ())}
        unseen = [n for n in exam_names(data) if n not in seen]
        site = [n for n in unseen if stratum(n) == SITE]
        groups = [site[i : i + length] for i in range(0, len(site) - length + 1, length)]
        if length < 2 or not groups:
            raise SystemExit(
                f"{name} has {len(site)} {SITE} exam(s) it never saw: no chain of {length}"
            )
        groups = groups[:count]
        # Exams it was validated on but never trained on measure forgetting too.
        trained = set(training.get("train_exams", ()))
        others = [n for n in exam_names(data) if n not in trained and stratum(n) != SITE]
        exams = {n: data / n for n in [*(n for g in groups for n in g), *others]}
        exams[SAMPLE] = ROOT / "sample_data" / "brats2018"
        return cls(
            model,
            f"The {model.label} model at a new site (trained or validated on {len(seen)} "
            "exams, none of these)",
            exams,
            [chain for group in groups for chain in rotations(group)],
            [*others, SAMPLE],
            threads,
        )

    def segment(self, model, name: str):
        from napari_tumorseg.core.inference import segment
        from napari_tumorseg.core.jobs import run_to_end

        return run_to_end(segment(self.exams[name], model, device="cpu"))

    def predict(self, model, name: str) -> np.ndarray:
        return self.segment(model, name).labels.array

    def wt_volumes(self, name: str) -> tuple[float, float]:
        """The fold model's whole tumour and the expert's, mL."""
        exam = self.exams[name]
        ml = exam.reference.voxel_volume_ml
        return (self.base[name] > 0).sum() * ml, (exam.labels.array > 0).sum() * ml

    def dice(self, labels: np.ndarray, name: str) -> np.ndarray:
        from napari_tumorseg.core.metrics import evaluate_labels

        exam = self.exams[name]
        scores = evaluate_labels(labels, exam.labels.array, exam.reference.spacing, hd95=False)
        return np.array([scores[r]["dice"] for r in REGIONS])


def keep_chain(bench: SiteBench, chain: list[str], seconds: float, simulate_user):
    """The product's "keep" along ``chain``: per step, the gains of the exams not corrected
    yet; at the end, the other sites' WT change; the steps each "keep" made."""
    from napari_tumorseg.core.finetune import finetune
    from napari_tumorseg.core.jobs import run_to_end

    model, prediction = bench.model, bench.base[chain[0]]
    gains, steps = [], []
    for k, name in enumerate(chain[:-1], start=1):
        expert = bench.exams[name].labels.array
        corrected, edited, _ = simulate_user(expert, prediction)
        result = run_to_end(
            finetune(model, bench.exams[name], corrected, edited, mode="keep", seconds=seconds)
        )
        model = result.model(model)
        steps.append(result.steps)
        rest = {n: bench.predict(model, n) for n in chain[k:]}
        gains.append({n: bench.dice(rest[n], n) - bench.base_dice[n] for n in rest})
        prediction = rest[chain[k]]
    forgetting = {
        n: float(bench.dice(bench.predict(model, n), n)[0] - bench.base_dice[n][0])
        for n in bench.others
    }
    return gains, forgetting, steps


class Calibration:
    """The ``calibration`` candidate: features of each exam (the fold model's logits on its
    brain voxels) computed once, fits on the pooled corrected slices."""

    def __init__(self, bench: SiteBench, corrected_slices) -> None:
        from napari_tumorseg.core import refine
        from napari_tumorseg.core.inference import exam_to_channels
        from napari_tumorseg.core.io import SEQUENCES
        from napari_tumorseg.core.jobs import run_to_end

        self.bench, self.cache = bench, {}
        for name, exam in bench.exams.items():
            channels = exam_to_channels(exam)
            present = [SEQUENCES.index(s) for s in (channels.channels or SEQUENCES)]
            probabilities = bench.results[name].probabilities.array
            features, box, mask = run_to_end(
                refine.head_features(channels.array, present, probabilities, channels.spacing)
            )
            rows = np.zeros(exam.labels.array.shape[0], bool)
            rows[corrected_slices(exam.labels.array)] = True
            self.cache[name] = (features[:, :3], box, mask, rows[box[0]], probabilities)

    def fit(self, names: list[str]):
        import torch

        from napari_tumorseg.core.training import region_targets

        xs, ys = [], []
        for name in names:
            logits, box, mask, rows, _ = self.cache[name]
            on_rows = mask & rows[:, None, None]
            xs.append(logits[on_rows[mask]])
            expert = self.bench.exams[name].labels.array[box]
            ys.append(region_targets(expert[on_rows]).T)
        x = torch.from_numpy(np.concatenate(xs))
        y = torch.from_numpy(np.concatenate(ys).astype(np.float32))
        layer = torch.nn.Linear(3, 3)
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
        optimizer = torch.optim.LBFGS(
            layer.parameters(), max_iter=50, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x + layer(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        return layer.requires_grad_(False)

    def labels(self, layer, name: str) -> np.ndarray:
        import torch

        from napari_tumorseg.core import refine
        from napari_tumorseg.core.labels import card_labels

        logits, box, mask, _, probabilities = self.cache[name]
        x = torch.from_numpy(logits)
        refined = torch.sigmoid(x + layer(x)).numpy()
        out = probabilities.copy()
        crop = out[(slice(None), *box)]
        for r in range(3):
            crop[r][mask] = refined[:, r]
        network = probabilities[(slice(None), *box)]
        zone = refine._touching(crop[0] > 0.5, refine.keep_largest_component(network[0] > 0.5))
        crop[:, (crop[0] > 0.5) & ~zone] = network[:, (crop[0] > 0.5) & ~zone]
        # As for an exam head: fitted to the user's labels, cut at 0.5 (no card thresholds).
        rules = {
            k: v
            for k, v in (self.bench.model.card.get("postprocess") or {}).items()
            if k not in ("why", "thresholds")
        }
        spacing = self.bench.exams[name].reference.spacing
        return card_labels(out, rules, float(np.prod(spacing)) / 1000)

    def chain(self, chain: list[str]):
        gains = []
        for k in range(1, len(chain)):
            layer = self.fit(chain[:k])
            gains.append(
                {
                    n: self.bench.dice(self.labels(layer, n), n) - self.bench.base_dice[n]
                    for n in chain[k:]
                }
            )
        forgetting = {
            n: float(self.bench.dice(self.labels(layer, n), n)[0] - self.bench.base_dice[n][0])
            for n in self.bench.others
        }
        return gains, forgetting, []


def run(args, simulate_user, corrected_slices, write_section, store_measured) -> None:
    started = time.perf_counter()
    if args.deployed:
        bench = SiteBench.of_deployed(
            args.deployed, args.data, args.threads, args.chain_length, args.chains
        )
        command = (
            f"python benchmarks/bench_finetune.py --site --deployed {args.deployed} "
            f"--chain-length {args.chain_length} --chains {args.chains} --seconds {args.seconds:g}"
        )
        title, key = f"Fine-tuning, a new site's exams in a row ({args.deployed} model)", "deployed"
    else:
        bench = SiteBench.of_fold(args.recipe, args.fold, args.data, args.threads)
        command = (
            f"python benchmarks/bench_finetune.py --site --fold {args.fold} --recipe "
            f"{args.recipe} --seconds {args.seconds:g}"
        )
        title, key = f"Fine-tuning, a site's exams in a row (fold {args.fold})", "chains"
    results = {}
    calibration = Calibration(bench, corrected_slices) if "calibration" in args.candidates else None
    for candidate in args.candidates:
        results[candidate] = []
        for chain in bench.chains:
            if candidate == "keep":
                outcome = keep_chain(bench, chain, args.seconds, simulate_user)
            else:
                outcome = calibration.chain(chain)
            results[candidate].append((chain, *outcome))
            print(candidate, chain, outcome, flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = report(command, args.threads, bench, results, minutes)
    print("\n".join(lines))
    if not args.no_write:
        write_section(title, "\n".join(lines))
        if "keep" in results:
            store_measured(
                f"keep_{bench.model.card['spatial_dims']}d_site_{key}",
                command,
                summarise(results["keep"], len(bench.chains[0])),
            )


def summarise(runs, n_site: int) -> dict:
    """Mean gain (WT, TC, ET) on the next exams after 1 .. n - 1 corrected exams, and the
    other sites' worst WT change."""
    after = {}
    for k in range(1, n_site):
        deltas = [d for _, gains, _, _ in runs for d in gains[k - 1].values()]
        after[k] = np.mean(deltas, axis=0).round(4).tolist()
    worst = min((v for _, _, forgetting, _ in runs for v in forgetting.values()), default=0.0)
    return {"gain_after": after, "other_sites_worst_wt": round(worst, 4)}


def report(command: str, threads: int, bench: SiteBench, results, minutes: float) -> list[str]:
    def fmt(values) -> str:
        return " / ".join(f"{v:+.3f}" for v in values)

    n = len(bench.chains[0])
    lines = [
        f"Command: `{command}` ({threads} CPU threads, {minutes:.0f} min in all). "
        f"{bench.described}; the chains: {len(bench.chains)} orders of {n} of its {SITE} exams "
        f"({', '.join(bench.site)}), each exam last once in its group; other sites: "
        f"{', '.join(bench.others) or 'none'}. Each corrected exam: 3 axial slices with the "
        "expert labels. Change of Dice against the model on the exams of the chain not "
        "corrected yet (whole exam, WT / TC / ET).",
        "",
        "The model, whole exam, WT / TC / ET: "
        + "; ".join(
            f"{name} {' / '.join(f'{v:.3f}' for v in bench.base_dice[name])}"
            for name in bench.exams
        )
        + ".",
        "",
        "What a site could teach -- the model's whole tumour against the expert's: "
        + "; ".join(
            f"{name} {volumes[0]:.0f} / {volumes[1]:.0f} mL ({volumes[0] / volumes[1] - 1:+.0%})"
            for name, volumes in ((n, bench.wt_volumes(n)) for n in bench.site)
        )
        + ".",
        "",
        "| candidate | chain | "
        + " | ".join(f"after {k} corrected" for k in range(1, n))
        + " | other sites, WT change | keep steps |",
        "|---|---|" + "---|" * (n - 1) + "---|---|",
    ]
    for candidate, runs in results.items():
        for chain, gains, forgetting, steps in runs:
            lines.append(
                f"| {candidate} | {' then '.join(c.replace('Brats18_', '') for c in chain)} | "
                + " | ".join(fmt(np.mean(list(g.values()), axis=0)) for g in gains)
                + " | "
                + ", ".join(f"{k.replace('Brats18_', '')} {v:+.3f}" for k, v in forgetting.items())
                + f" | {', '.join(map(str, steps)) or '-'} |"
            )
    lines += ["", "Mean over the chains:", ""]
    for candidate, runs in results.items():
        summary = summarise(runs, n)
        last = summary["gain_after"][n - 1]
        lines.append(
            f"- {candidate}: "
            + "; ".join(f"after {k}: {fmt(v)}" for k, v in summary["gain_after"].items())
            + f"; other sites' worst WT change {summary['other_sites_worst_wt']:+.3f}. Goal "
            f"(after 3 corrected exams WT >= +0.05, no other-site exam losing > 0.01): "
            + (
                "met"
                if n - 1 >= 3 and last[0] >= 0.05 and summary["other_sites_worst_wt"] >= -0.01
                else "NOT met"
            )
            + "."
        )
    return lines
