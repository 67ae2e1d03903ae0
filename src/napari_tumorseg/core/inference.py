"""Segmenting an exam: `segment` prepares it (brain box, model spacing, z-scores), runs a model's
engine -- overlapping sub-volumes in 3D (`sliding`), axial slices in 2D (`slices`) --, maps the
probabilities back onto the exam's grid as they become final, applies a model's exam head, and
cuts the label map with the card's rules (`labels`).

Every engine is a generator: it yields progress events between batches and returns its result
through ``StopIteration.value`` (``result = yield from engine``); so does `segment`, whose events
(`SegmentationProgress`) are on the exam's own grid, so that a viewer paints the map as it fills
in. Closing the generator (``generator.close()``, or napari's ``worker.quit()``) stops it
cleanly before the next batch.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .devices import autocast_dtype, precision_label, select_device
from .errors import TumorSegError
from .io import SEQUENCES, Exam
from .jobs import map_events
from .labels import card_labels, region_thresholds
from .postprocess import minor_tumours_note, remove_minor_tumours
from .predictor import InferenceProgress
from .preprocess import SKULL_ON_WARNING, Prepared, prepare
from .slices import VIEWS, views_inference
from .sliding import sliding_window
from .volume import Volume
from .windows import REGION_NAMES, Box


def exam_to_channels(exam: Exam) -> Volume:
    """The scans of an exam as one (4, Z, Y, X) float32 Volume in the order t1, t1ce, t2, flair.

    The scans must already lie on one grid (use the registration module's ``stack_sequences``
    otherwise). Missing sequences are zero channels; ``channels`` lists the present ones.

    Raises
    ------
    TumorSegError
        The exam has no scan, or its scans lie on different grids (naming them).
    """
    reference = check_one_grid(exam)
    array = np.zeros((len(SEQUENCES), *reference.spatial_shape), dtype=np.float32)
    for c, name in enumerate(SEQUENCES):
        if name in exam.scans:
            array[c] = exam.scans[name].array
    present = tuple(s for s in SEQUENCES if s in exam.scans)
    return reference.with_array(array, name=exam.name or "exam", channels=present)


def check_one_grid(exam: Exam) -> Volume:
    """The exam's reference scan, after checking (cheaply, no copy) that every scan lies on its
    grid; raises `TumorSegError` as `exam_to_channels` does."""
    if not exam.scans:
        raise TumorSegError("the exam holds no scan")
    reference = exam.reference
    ref_name = _scan_text(reference.name or next(iter(exam.scans)), reference)
    others = [
        f"{_scan_text(name, scan)} ({_grid_text(scan)})"
        for name, scan in exam.scans.items()
        if not scan.same_grid(reference)
    ]
    if others:
        raise TumorSegError(
            f"{', '.join(others)} {'does' if len(others) == 1 else 'do'} not lie on the grid of "
            f"{ref_name} ({_grid_text(reference)}); register the sequences first "
            "(the Register sequences dock, or tumorseg segment --register)"
        )
    return reference


def _scan_text(name: str, volume: Volume) -> str:
    """``flair`` or, for a scan read from a file, ``flair (case_flair.nii.gz)``."""
    path = volume.source.path if volume.source is not None else None
    return name if path is None else f"{name} ({Path(path).name})"


def _grid_text(volume: Volume) -> str:
    shape = "x".join(map(str, volume.spatial_shape))
    spacing = "x".join(f"{s:.3g}" for s in volume.spacing)
    return f"{shape} voxels of {spacing} mm"


#: The share of a segmentation's progress given to applying a model's exam head (its features
#: take about a third of a 3D model's windows on 2 cores).
HEAD_SHARE = 0.25


@dataclass(frozen=True)
class SegmentationProgress:
    """One step of `segment`, on the INPUT grid (the full-size exam, Z, Y, X).

    Attributes
    ----------
    done, total : int
        Windows (3D) or slices (2D) computed, and to compute.
    box : tuple of slice or None
        Region of the input grid whose probabilities just became final (never repainted).
        None when nothing became final in this step. With resampling (model spacing differs
        from the exam's), voxels on the seams between final regions arrive with the result.
    probabilities : numpy.ndarray or None
        float32 (3, *box): WT, TC, ET probabilities in ``box``, as in the final result;
        computed when first read (``final()``), in the thread that reads it.
    window : tuple of slice or None
        Input-grid box of the windows computed in this step (a live preview region).
    preview : callable or None
        ``preview() -> (box, (3, *box) float32)``: the blend so far over ``window``, mapped to
        the input grid. Only values inside final boxes are exact.
    part : float
        Windows or slices of the batch after ``done`` computed so far
        (`InferenceProgress.part`): a 3D window, or a batch of slices, takes seconds, and
        progress moves within it.
    warnings : tuple of str
        Doubts about the input known before the network runs (e.g. a skull still on), on the
        first event only, so that a user hears of them before waiting for the result (they
        are in the result's ``warnings`` too).
    tail, finishing : float
        The share of the job that follows the windows (a model's exam head: seconds of
        features, `HEAD_SHARE`; 0 without one), and how much of it is done.
    """

    done: int
    total: int
    box: Box | None
    _: KW_ONLY
    window: Box | None = None
    preview: Callable[[], tuple[Box | None, np.ndarray | None]] | None = field(
        default=None, repr=False
    )
    final: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)
    part: float = 0.0
    warnings: tuple[str, ...] = ()
    tail: float = 0.0
    finishing: float = 0.0

    @property
    def fraction(self) -> float:
        """The share of the work done, in [0, 1]."""
        windows = min(1.0, (self.done + self.part) / self.total) if self.total else 1.0
        return (1 - self.tail) * windows + self.tail * self.finishing

    @functools.cached_property
    def probabilities(self) -> np.ndarray | None:
        return None if self.final is None else self.final()


@dataclass
class SegmentationResult:
    """What `segment` returns.

    Attributes
    ----------
    probabilities : Volume
        float32 (3, Z, Y, X) WT, TC, ET probabilities on the input grid (0 outside the brain).
    labels : Volume
        uint8 (Z, Y, X) BraTS labels (0, 1, 2, 4) on the input grid.
    used_sequences : tuple of str
        Sequences the result rests on.
    missing_sequences : tuple of str
        Sequences that were missing (filled as the model card says).
    seconds : float
        Wall-clock time of the whole segmentation.
    device : str
        Device the network ran on at the end.
    precision : str
        The network's arithmetic there: "float32", "bfloat16 autocast" or "float16 autocast".
    notes : tuple of str
        What else the user should know (e.g. whether a model's exam head was applied).
    warnings : tuple of str
        What makes the map doubtful (e.g. an exam that is not skull-stripped).
    skull_stripped : bool
        Whether the exam looked skull-stripped (zero background around the brain).
    postprocess : dict
        The rules that made ``labels`` from ``probabilities`` (`card_labels`), with the
        per-region ``thresholds`` actually used: to redo the labels at other thresholds alike.
    """

    probabilities: Volume
    labels: Volume
    used_sequences: tuple[str, ...]
    missing_sequences: tuple[str, ...]
    seconds: float
    device: str = "cpu"
    precision: str = "float32"
    notes: tuple[str, ...] = ()
    postprocess: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    skull_stripped: bool = True


class _ModelToInput:
    """Maps boxes and values from the model grid (cropped, resampled) to the input grid.

    The values are interpolated exactly as `Prepared.to_input_grid` does (trilinear,
    ``align_corners=False``), so a final box's values equal the final result's.
    """

    def __init__(self, prepared: Prepared, mask: np.ndarray | None):
        self.offset = [s.start for s in prepared.box]
        self.crop = [s.stop - s.start for s in prepared.box]
        self.model = list(prepared.image.shape[1:])
        self.mask = mask
        # 0 outside the brain on the input grid too, as `Prepared.to_input_grid(mask=True)`.
        self.input_mask = prepared.input_mask if mask is not None else None
        self.identity = self.crop == self.model
        self.axes = []
        if not self.identity:
            for n_in, n_model in zip(self.crop, self.model):
                src = np.maximum((np.arange(n_in) + 0.5) * (n_model / n_in) - 0.5, 0.0)
                low = np.floor(src).astype(np.int64)
                lam = (src - low).astype(np.float32)
                high = np.minimum(low + 1, n_model - 1)
                self.axes.append((low, high, lam))

    def map_box(self, box: Box) -> Box | None:
        """The input-grid box whose values are interpolated from model-grid ``box`` alone."""
        if self.identity:
            return tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, self.offset))
        out = []
        for (low, high, _), s, o in zip(self.axes, box, self.offset):
            inside = np.flatnonzero((low >= s.start) & (high < s.stop))
            if inside.size == 0:
                return None
            out.append(slice(int(inside[0]) + o, int(inside[-1]) + 1 + o))
        return tuple(out)

    def __call__(self, box: Box | None, values: np.ndarray | None):
        """(model box, (K, *box)) -> (input box, (K, *input box)); (None, None) when empty."""
        if box is None or values is None:
            return None, None
        if self.mask is not None:
            values = values * self.mask[box]
        out_box = self.map_box(box)
        if out_box is None:
            return None, None
        if self.identity:
            return out_box, self._masked(out_box, values)
        for axis, ((low, high, lam), s, o) in enumerate(zip(self.axes, box, self.offset)):
            i0, i1 = out_box[axis].start - o, out_box[axis].stop - o
            matrix = np.zeros((i1 - i0, s.stop - s.start), dtype=np.float32)
            rows = np.arange(i1 - i0)
            np.add.at(matrix, (rows, low[i0:i1] - s.start), 1 - lam[i0:i1])
            np.add.at(matrix, (rows, high[i0:i1] - s.start), lam[i0:i1])
            values = np.moveaxis(np.tensordot(matrix, values, axes=([1], [axis + 1])), 0, axis + 1)
        return out_box, self._masked(out_box, np.ascontiguousarray(values, dtype=np.float32))

    def _masked(self, out_box: Box, values: np.ndarray) -> np.ndarray:
        if self.input_mask is None:
            return values
        crop = tuple(slice(s.start - o, s.stop - o) for s, o in zip(out_box, self.offset))
        return values * self.input_mask[crop]


def check_overlap(overlap: float) -> float:
    """``overlap`` if it is a window overlap (in [0, 1)), else a `TumorSegError`."""
    if not 0 <= overlap < 1:
        raise TumorSegError(f"the window overlap must be at least 0 and below 1, got {overlap}")
    return overlap


def model_grid_spacing(card: dict, spacing) -> list[float]:
    """The spacing (mm, Z Y X) an exam of ``spacing`` is resampled to for the model: the card's,
    except a 2D model's slices, which stay the exam's own (resampled in-plane only)."""
    model_spacing = [float(s) for s in card["spacing_mm"]]
    if int(card["spatial_dims"]) == 2:
        model_spacing = [float(spacing[0]), *model_spacing[-2:]]
    return model_spacing


def slice_context(card: dict) -> int:
    """Zero voxels a 2D model sees around each slice on every side (card ``context_mm``, at
    the card's in-plane spacing): see `slices.slice_inference`."""
    context = float(card.get("context_mm", 0))
    if not context >= 0:
        raise TumorSegError(f"model card says context_mm={context}; expected 0 or more mm")
    return round(context / float(card["spacing_mm"][-1]))


def segment(
    exam_or_channels: Exam | Volume,
    model,
    device: str | torch.device = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    batch_size: int | None = None,
    threshold: float | None = None,
    restrict_to_brain: bool = True,
    precision: str = "auto",
    postprocess: bool = True,
    window: str | int | None = None,
    views: Sequence[str] | None = None,
) -> Generator[SegmentationProgress, None, SegmentationResult]:
    """Segment a brain tumour: prepare the exam, run the model, threshold to BraTS labels.

    A generator: yields `SegmentationProgress` (on the input grid) between batches and returns a
    `SegmentationResult` through ``StopIteration.value``. Closing it stops before the next batch.

    Steps: brain mask and crop to the brain's box, resampling to ``card["spacing_mm"]``,
    per-channel z-score, zeros for missing sequences (`preprocess.prepare`); then overlapping
    windows of ``card["patch_size"]`` (`sliding_window`, windows without brain skipped) for 3D
    models or slices (`views_inference`: axial, and the card's other views) for 2D models; then
    the map goes back onto the input grid, the model's exam head where it was fitted on this
    exam (`refine`), and `probabilities_to_labels`.

    Parameters
    ----------
    exam_or_channels : Exam or Volume
        An exam whose scans lie on one grid, or a (4, Z, Y, X) Volume in the channel order t1,
        t1ce, t2, flair whose ``channels`` name the present sequences (empty: all four).
    model : TumorModel or str
        A loaded model or a model name for `models.load_model`. Its network is moved to the
        device.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"`` (see `select_device`).
    overlap : float
        Window overlap in [0, 1) (3D models).
    tta : bool
        Mirroring test-time augmentation (8x the compute in 3D, 4x in 2D).
    batch_size : int, optional
        Windows (default 1 on a CPU, where a batch is no faster than its windows one after
        the other and the first window's map shows sooner; 2 elsewhere) or slices (default
        16) per forward pass.
    threshold : float, optional
        Probability above which a voxel belongs to a region (default: the model card's
        ``postprocess`` thresholds, else 0.5; 0.5 where an exam head is applied: its
        probabilities are fitted to the user's labels).
    restrict_to_brain : bool
        Set probabilities outside the brain mask to 0 (tumour lies inside the brain).
    precision : {"auto", "float32"}
        Mixed precision where the device has it natively (see `autocast_dtype`), or float32.
    postprocess : bool
        Apply the model card's ``postprocess`` rules to the label map (`card_labels`); the
        probabilities are returned as the network (and an exam head) gave them either way.
    window : {None, "fit"} or int
        3D models: the windows -- the card's (its ``window``, else sliding windows of its
        ``patch_size``), ``"fit"`` (one window holding the whole brain box, rounded up to the
        network's divisor: no window grid for the labels to depend on, half the work of two
        overlapping windows), or a cubic window edge in voxels.
    views : sequence of {"axial", "coronal", "sagittal"}, optional
        2D models: the slices the network runs over, maps averaged (default: the card's
        ``views``, else axial alone). Views other than axial need slices no thicker than
        `MULTIVIEW_SLICE_RATIO` times the model's in-plane spacing; on thicker slices the
        axial view runs alone and a note says so.

    Raises
    ------
    TumorSegError
        Wrong channel count, no sequence present, scans on different grids, no brain voxel,
        unavailable device.
    """
    started = time.perf_counter()
    check_overlap(overlap)
    if isinstance(model, str):
        from .models import load_model

        model = load_model(model)
    channels = exam_or_channels
    if isinstance(channels, Exam):
        channels = exam_to_channels(channels)
    array = channels.array
    if array.ndim != 4 or array.shape[0] != len(SEQUENCES):
        raise TumorSegError(
            f"segmentation needs a 4-channel (t1, t1ce, t2, flair) volume, got shape {array.shape}"
        )
    present_names = tuple(channels.channels) or SEQUENCES
    unknown = [n for n in present_names if n not in SEQUENCES]
    if unknown:
        raise TumorSegError(f"unknown sequence(s) {unknown}; use {list(SEQUENCES)}")
    used = tuple(s for s in SEQUENCES if s in present_names)
    missing = tuple(s for s in SEQUENCES if s not in present_names)
    if not used:
        raise TumorSegError("no sequence given: at least one of t1, t1ce, t2, flair is needed")
    card = model.card
    spatial_dims = int(card["spatial_dims"])
    if spatial_dims != 2 and views is not None:
        raise TumorSegError("views are for 2D models; a 3D model reads the whole volume")
    model_spacing = model_grid_spacing(card, channels.spacing)
    context = slice_context(card) if spatial_dims == 2 else 0  # a bad card fails before work
    present = [SEQUENCES.index(s) for s in used]
    # The brain's own box, no margin: a margin is cut short where the brain reaches the
    # volume's edge (BraTS exams' lowest slice), so the crop -- and every label -- would move
    # when the same exam comes padded or cropped (tests/core/test_inference.py).
    prepared = prepare(array, channels.spacing, model_spacing, present=present, margin=0)
    doubts = () if prepared.skull_stripped else (SKULL_ON_WARNING,)
    mask = prepared.mask if restrict_to_brain else None
    to_input = _ModelToInput(prepared, mask)
    notes: tuple[str, ...] = ()
    torch_device = select_device(device)
    autocast_dtype(torch_device, precision)  # a wrong precision fails before any work
    if spatial_dims == 3:
        engine = sliding_window(
            model.network,
            prepared.image,
            window_size(window or card.get("window"), card, prepared.image.shape[1:], model),
            overlap=overlap,
            batch_size=batch_size or (1 if torch_device.type == "cpu" else 2),
            mask=prepared.mask,
            device=torch_device,
            tta=tta,
            precision=precision,
        )
    elif spatial_dims == 2:
        views, notes = _views(views, card, float(channels.spacing[0]), model_spacing[-1])
        engine = views_inference(
            model.network,
            prepared.image,
            views,
            batch_size=batch_size or 16,
            mask=prepared.mask,
            device=torch_device,
            tta=tta,
            precision=precision,
            context=context,
        )
    else:
        raise TumorSegError(f"model card says spatial_dims={spatial_dims}; expected 2 or 3")
    last_device = torch_device.type
    early = doubts
    tail = HEAD_SHARE if getattr(model, "head", None) is not None else 0.0
    total = 0
    try:
        while True:
            try:
                event = next(engine)
            except StopIteration as stop:
                maps = stop.value
                break
            last_device = event.device
            box = final = window = preview = None
            if event.box is not None:
                box = to_input.map_box(event.box)
                if box is not None:
                    final = functools.partial(_final, to_input, event)
            if event.window is not None and event.current is not None:
                window = to_input.map_box(event.window)
                preview = functools.partial(_preview, to_input, event.window, event.current)
            yield SegmentationProgress(
                event.done,
                event.total,
                box,
                window=window,
                preview=preview,
                final=final,
                part=event.part,
                warnings=early,
                tail=tail,
            )
            total = event.total
            early = ()  # on the first event only (the result repeats them)
    finally:
        engine.close()
    if mask is not None:
        maps *= mask
    probabilities = prepared.to_input_grid(maps, mask=restrict_to_brain)
    rules = card.get("postprocess") if postprocess else None
    if getattr(model, "head", None) is not None:
        probabilities, head_notes, applied = yield from map_events(
            _apply_exam_head(model, channels, present, probabilities, overlap, tta),
            lambda f: SegmentationProgress(total, total, None, tail=tail, finishing=f),
        )
        notes = (*notes, *head_notes)
        if rules and applied:
            # The head's probabilities are fitted to the user's labels (cut at 0.5): the
            # card's thresholds, chosen for the network's calibration, do not apply to them.
            rules = {k: v for k, v in rules.items() if k != "thresholds"}
    rules = {k: v for k, v in (rules or {}).items() if k != "why"}
    if threshold is not None:
        rules["thresholds"] = threshold
    rules["thresholds"] = list(region_thresholds(rules.get("thresholds", 0.5)))
    voxel_ml = float(np.prod(channels.spacing)) / 1000
    # The card's last rule, minor tumour pieces, is applied here to say what it removed.
    share = rules.get("minor_share")
    labels = card_labels(
        probabilities, {k: v for k, v in rules.items() if k != "minor_share"}, voxel_ml
    )
    if share:
        kept = remove_minor_tumours(labels, float(share))
        notes = (*notes, *minor_tumours_note(labels, kept, float(share), voxel_ml))
        labels = kept
    return SegmentationResult(
        probabilities=channels.with_array(
            probabilities, name="probabilities", channels=REGION_NAMES
        ),
        labels=channels.with_array(labels, name="labels", channels=()),
        used_sequences=used,
        missing_sequences=missing,
        seconds=time.perf_counter() - started,
        device=last_device,
        precision=precision_label(last_device, precision),
        notes=notes,
        postprocess=rules,
        warnings=doubts,
        skull_stripped=prepared.skull_stripped,
    )


#: The thickest slices, as a multiple of a 2D model's in-plane spacing, on which it also runs
#: over coronal and sagittal slices: those of a thicker stack would be squashed.
MULTIVIEW_SLICE_RATIO = 1.5


def _views(views, card: dict, slice_mm: float, plane_mm: float) -> tuple[tuple[str, ...], tuple]:
    """The views a 2D model runs over on slices ``slice_mm`` thick, and a note if some of
    those asked for were left out."""
    asked = tuple(views if views is not None else card.get("views", ("axial",)))
    unknown = [v for v in asked if v not in VIEWS]
    if not asked or unknown:
        raise TumorSegError(f"unknown view(s) {unknown or asked}; use some of {list(VIEWS)}")
    if slice_mm <= MULTIVIEW_SLICE_RATIO * plane_mm or asked == ("axial",):
        return asked, ()
    others = [v for v in asked if v != "axial"]
    note = (
        f"{' and '.join(others)} view(s) left out: the exam's slices are {slice_mm:.1f} mm "
        f"thick (the model reads {plane_mm:g} mm); axial slices alone"
    )
    return ("axial",), (note,)


def window_size(window, card: dict, shape, model) -> list[int]:
    """The 3D window for `segment`'s ``window`` on a prepared image of ``shape``."""
    if window is None:
        return list(card["patch_size"])
    if window == "fit":
        divisor = int(getattr(model.network, "divisor", 1))
        return [-(-int(n) // divisor) * divisor for n in shape]
    if isinstance(window, int) or str(window).isdigit():
        return [int(window)] * len(shape)
    raise TumorSegError(f'the inference window must be "fit" or a size in voxels, not {window!r}')


def _apply_exam_head(model, channels: Volume, present, probabilities, overlap, tta):
    """The probabilities with ``model``'s exam head applied -- only on the exam it was fitted
    on (`refine`) --, notes saying which happened, and whether it was applied. A job yielding
    the share of its work done."""
    from .refine import apply_head, exam_fingerprint

    entry = model.card["exam_head"]
    exam = entry["exam"]
    if exam_fingerprint(channels.array, present, channels.spacing) != entry["fingerprint"]:
        if channels.name == exam:
            why = f"the scans of {exam} differ from those it was fitted on (edited, re-registered?)"
        else:
            why = "it was fitted on another exam"
        return (
            probabilities,
            (
                f"{model.label} was adapted to {exam}, but its exam head is not applied: "
                f"{why}; the network alone segmented this exam",
            ),
            False,
        )
    notes = [f"with the exam head fitted on the corrections of {exam}"]
    fitted = entry.get("segmentation", {})
    if fitted and (fitted.get("overlap"), fitted.get("tta")) != (overlap, tta):
        notes.append(
            f"the head was fitted on a segmentation with overlap {fitted.get('overlap')} and "
            f"TTA {'on' if fitted.get('tta') else 'off'}; this one used overlap {overlap} and "
            f"TTA {'on' if tta else 'off'}, which it has not seen"
        )
    refined = yield from apply_head(
        model.head,
        channels.array,
        present,
        probabilities,
        channels.spacing,
        anchors=entry.get("anchors", ()),
    )
    return refined, tuple(notes), True


def _preview(to_input: _ModelToInput, window: Box, current: Callable[[Box], np.ndarray]):
    return to_input(window, current(window))


def _final(to_input: _ModelToInput, event: InferenceProgress) -> np.ndarray | None:
    return to_input(event.box, event.partial)[1]
