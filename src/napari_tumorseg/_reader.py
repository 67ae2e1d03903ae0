"""npe2 reader: NIfTI files and exam folders, dropped on napari or opened from File > Open."""

from __future__ import annotations

from pathlib import Path

from ._layers import labels_layer_data, layer_volume, scan_layer_data
from .core.errors import TumorSegError
from .core.io import SEQUENCES, file_stem, is_nifti_path, read_exam, read_volume
from .core.volume import check_grid_match

# What npe2/napari treat as "handled, nothing to add" (after we showed the user an error).
_NOTHING = [(None,)]


def get_reader(path):
    """Return `read_nifti` for .nii/.nii.gz files and folders holding NIfTI files."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        return None
    for p in map(Path, paths):
        if p.is_dir():
            if not any(is_nifti_path(c) for c in p.iterdir()):
                return None
        elif not is_nifti_path(p):
            return None
    return read_nifti


def read_nifti(path) -> list[tuple]:
    """Layer data for NIfTI files or one exam folder; errors become napari notifications."""
    from napari.utils.notifications import show_error, show_warning

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    try:
        layers, warnings = read_layers(paths, open_scans=_open_scan_volumes())
    except TumorSegError as exc:
        show_error(str(exc))
        return _NOTHING
    for message in warnings:
        show_warning(message)
    return layers or _NOTHING


def read_layers(paths, open_scans=()) -> tuple[list[tuple], list[str]]:
    """Layer-data tuples and warnings for files and exam folders (no napari needed).

    ``open_scans`` are the scans already in the viewer: a label map read on its own must lie on
    the grid of one of them or of a scan read alongside it.
    """
    layers: list[tuple | None] = []
    warnings: list[str] = []
    scans = []
    pending_labels = []
    for p in map(Path, paths):
        if p.is_dir():
            exam = read_exam(p)
            warnings += exam.skipped
            scans += exam.scans.values()
            layers += [scan_layer_data(v) for v in exam.scans.values()]
            if exam.labels is not None:
                layers.append(labels_layer_data(exam.labels, name=f"{exam.name} labels"))
            continue
        volume = read_volume(p)
        if volume.name == "labels":
            pending_labels.append((len(layers), volume, p))
            layers.append(None)
            continue
        if volume.name not in SEQUENCES:
            warnings.append(
                f"{p}: unknown sequence name; opened as '{volume.name}'. Name the file "
                "*_t1, *_t1ce, *_t2 or *_flair so the plugin knows which sequence it is"
            )
        scans.append(volume)
        layers.append(scan_layer_data(volume))
    candidates = [*open_scans, *scans]
    for index, volume, p in pending_labels:
        if candidates:
            check_grid_match(volume, candidates, p)
        layers[index] = labels_layer_data(volume, name=file_stem(p))
    # Opaque scans on one grid, read together (an exam folder, files dropped at once): only
    # the top one can be seen, so only it starts visible. The picture is the same, and napari
    # neither slices nor draws hidden layers: moving through the slices, and every repaint,
    # cost one scan instead of four. Scans on other grids (an unregistered exam) stay visible:
    # they reach where the top one does not.
    images = [kwargs for _, kwargs, kind in layers if kind == "image"]
    for volume, kwargs in zip(scans[:-1], images[:-1]):
        if volume.same_grid(scans[-1]):
            kwargs.setdefault("visible", False)
    return layers, warnings


def _open_scan_volumes() -> list:
    """Scans (3D image layers) open in the current viewer."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no viewer (headless use of the reader)
        return []
    if viewer is None:
        return []
    return [
        layer_volume(layer)
        for layer in viewer.layers
        if layer._type_string == "image" and layer.ndim == 3
    ]
