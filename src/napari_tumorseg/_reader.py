"""npe2 reader: NIfTI files and exam folders, dropped on napari or opened from File > Open."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from ._layers import (
    is_volume_layer,
    labels_layer_data,
    layer_volume,
    probability_layer_data,
    scan_layer_data,
)
from ._notify import notify
from ._warmup import install_units, warm_up_layers
from .core.dicom import SeriesChoiceNeeded, holds_dicom, read_case
from .core.errors import TumorSegError
from .core.io import (
    SEQUENCES,
    case_name,
    classify_path,
    file_stem,
    holds_region_maps,
    is_nifti_path,
    read_probabilities,
    read_volume,
)
from .core.volume import check_grid_match

# What npe2/napari treat as "handled, nothing to add" (after we showed the user an error).
_NOTHING = [(None,)]


def get_reader(path):
    """Return `read_nifti` for .nii/.nii.gz files and folders holding NIfTI files or a DICOM
    study -- also an empty folder or one holding exam folders, so that the user is told what
    to drop instead of napari's "the reader refused the file"."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        return None
    for p in map(Path, paths):
        if p.is_dir():
            children = list(p.iterdir())
            # The exam folders' files are listed only when the folder itself holds no NIfTI.
            nested = (c for d in children if d.is_dir() for c in d.iterdir())
            if (
                children
                and not any(map(is_nifti_path, chain(children, nested)))
                and not holds_dicom(p)
            ):
                return None
        elif not is_nifti_path(p):
            return None
    return read_nifti


def read_nifti(path) -> list[tuple]:
    """Layer data for NIfTI files or one exam folder; errors become napari notifications."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    warm_up_layers()  # napari's first layers' set-up, beside the reading
    choices: dict = {}
    while True:
        try:
            layers, warnings = read_layers(paths, *open_volumes(), dicom_choices=choices)
            break
        except SeriesChoiceNeeded as exc:  # a study whose series the user must pick
            from .widgets._series_dialog import ask_series

            choice = ask_series(exc)
            if choice is None:
                notify(f"{exc.folder.name}: not opened (no series chosen)", severity="info")
                return _NOTHING
            choices[exc.folder] = choice
        except TumorSegError as exc:
            notify(exc)  # the file's name and the problem first; the full path in the details
            return _NOTHING
    for message in warnings:
        notify(message, severity="warning")
    install_units()
    return layers or _NOTHING


def read_layers(
    paths, open_scans=(), open_labels=(), dicom_choices=None
) -> tuple[list[tuple], list[str]]:
    """Layer-data tuples and warnings for files and exam folders (no napari needed).

    ``dicom_choices``: DICOM study folder -> the series the user chose for each sequence
    (`core.dicom.SeriesChoiceNeeded`).

    ``open_scans`` are the scans already in the viewer: a label map read on its own must lie on
    the grid of one of them or of a scan read alongside it. A file already open among them or
    ``open_labels`` (the label maps in the viewer) is warned about: a second copy.
    """
    layers: list[tuple | None] = []
    warnings: list[str] = []
    scans = []
    scan_layers = []  # their layer-data tuples, in the same order
    pending_labels = []
    label_maps = []  # the label maps read, for the "already open" warning
    exams: dict[str, Path] = {}  # exam name -> the first path read of it
    for p in map(Path, paths):
        if p.is_dir():
            exam = read_case(p, choice=(dicom_choices or {}).get(p))  # NIfTI or DICOM
            exams.setdefault(exam.name, p)
            warnings += exam.warnings
            scans += exam.scans.values()
            read = [scan_layer_data(v) for v in exam.scans.values()]
            scan_layers += read
            layers += read
            if exam.labels is not None:
                label_maps.append(exam.labels)
                layers.append(labels_layer_data(exam.labels, name=f"{exam.name} labels"))
            continue
        if holds_region_maps(p):  # what `tumorseg segment --prob` writes
            maps = read_probabilities(p)
            layers += [probability_layer_data(v, name=f"{file_stem(p)} {v.name}") for v in maps]
            continue
        volume = read_volume(p)
        if volume.name == "labels":
            label_maps.append(volume)
            pending_labels.append((len(layers), volume, p))
            layers.append(None)
            continue
        if volume.name not in SEQUENCES:
            warnings.append(
                f"{p.name}: unknown sequence name; opened as '{volume.name}'. Name the file "
                "*_t1, *_t1ce, *_t2 or *_flair so the plugin knows which sequence it is"
            )
        exams.setdefault(case_name(p), p)
        scans.append(volume)
        scan_layers.append(scan_layer_data(volume))
        layers.append(scan_layers[-1])
    if len(exams) > 1:
        warnings.append(
            f"these files belong to {len(exams)} exams ({', '.join(exams)}); their scans are "
            "named by sequence only: open one exam at a time to keep them apart"
        )
    warnings += _already_open([*scans, *label_maps], [*open_scans, *open_labels])
    candidates = [*open_scans, *scans]
    for index, volume, p in pending_labels:
        if candidates:
            scan = check_grid_match(volume, candidates, p)
            other = _exam_of(scan)
            if other is not None and other != case_name(p) and not scans:
                warnings.append(
                    f"{p}: a label map of exam {case_name(p)}, shown over the scans of exam "
                    f"{other} (they lie on the same grid): check that it belongs there"
                )
        layers[index] = labels_layer_data(volume, name=file_stem(p))
    # Opaque scans on one grid, read together (an exam folder, files dropped at once): only
    # the top one can be seen, so only it starts visible. The picture is the same, and napari
    # neither slices nor draws hidden layers: moving through the slices, and every repaint,
    # cost one scan instead of four. Scans on other grids (an unregistered exam) stay visible:
    # they reach where the top one does not.
    images = [kwargs for _, kwargs, _ in scan_layers]
    for volume, kwargs in zip(scans[:-1], images[:-1]):
        if volume.same_grid(scans[-1]):
            kwargs.setdefault("visible", False)
    return layers, warnings


def _exam_of(volume) -> str | None:
    """The exam name in a volume's file name, if it was read from a file."""
    path = volume.source.path if volume.source is not None else None
    return None if path is None else case_name(path)


def _already_open(volumes, open_volumes) -> list[str]:
    """A warning for scans and label maps whose file is open already (second copies, named
    " [1]"): one line for them all (an exam folder opened twice is one mistake)."""
    opened = {
        Path(v.source.path).resolve()
        for v in open_volumes
        if v.source is not None and v.source.path is not None
    }
    again = [
        Path(v.source.path).name
        for v in volumes
        if v.source is not None and v.source.path and Path(v.source.path).resolve() in opened
    ]
    if not again:
        return []
    what = again[0] if len(again) == 1 else f"{again[0]} and {len(again) - 1} more files"
    copies = "this is a second copy of it" if len(again) == 1 else "these are second copies"
    return [
        f"{what}: already open; {copies} (napari adds ' [1]' to the names) -- edits to one "
        "copy do not reach the other"
    ]


def open_volumes() -> tuple[list, list]:
    """Scans (3D image layers) and label maps (3D labels layers) open in the current viewer."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no viewer (headless use of the reader)
        return [], []
    if viewer is None:
        return [], []
    scans = [layer_volume(layer) for layer in viewer.layers if is_volume_layer(layer, "image")]
    # Label maps read from a file: a segmentation carries its scan's source (the geometry it is
    # saved in), which is not a label map being open.
    labels = [
        volume
        for volume in (
            layer_volume(layer) for layer in viewer.layers if is_volume_layer(layer, "labels")
        )
        if volume.source is not None
        and volume.source.path is not None
        and classify_path(volume.source.path) == "labels"
    ]
    return scans, labels
