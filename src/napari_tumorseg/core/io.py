"""Reading and writing NIfTI exams: sequence discovery, checks, BraTS label conventions.

This is the project's only NIfTI reader and writer: everything that touches a file goes through
`read_volume`, `read_exam` and `write_volume`.
"""

from __future__ import annotations

import errno
import glob
import gzip
import io
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import TumorSegError
from .volume import Volume, check_grid_match

#: Channel order of every multi-channel volume and model (contract 2.2).
SEQUENCES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: File-name tokens recognised for each sequence (case-insensitive).
SEQUENCE_TOKENS: dict[str, str] = {
    **dict.fromkeys(("t1", "t1n", "t1w", "t1native"), "t1"),
    **dict.fromkeys(("t1ce", "t1c", "t1gd", "t1post"), "t1ce"),
    **dict.fromkeys(("t2", "t2w"), "t2"),
    **dict.fromkeys(("flair", "t2f", "fla"), "flair"),
}

#: File-name tokens that mark a label map.
LABEL_TOKENS = frozenset({"seg", "label", "labels", "mask", "gt", "truth", "segmentation"})

#: BraTS 2018 label values: value -> (short name, description, RGBA colour in 0..1).
BRATS_LABELS: dict[int, tuple[str, str, tuple[float, float, float, float]]] = {
    1: ("NCR/NET", "necrotic / non-enhancing tumour core", (0.90, 0.10, 0.10, 1.0)),
    2: ("ED", "peritumoural oedema", (0.10, 0.85, 0.20, 1.0)),
    4: ("ET", "GD-enhancing tumour", (1.00, 0.85, 0.00, 1.0)),
}

#: Evaluated regions as sets of BraTS label values, in model output order.
#: 3 counts as enhancing tumour: files in the BraTS 2023 convention are read with 3 as 4, so
#: a 3 in a layer was painted there (napari's label spinner passes it between 2 and 4), and is
#: saved as 4 (`to_brats_labels`): measured as it will be saved.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3, 4), "TC": (1, 3, 4), "ET": (3, 4)}

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_path(path: str | Path) -> bool:
    """True for ``*.nii`` and ``*.nii.gz`` names (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def file_stem(path: str | Path) -> str:
    """The file name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _name_tokens(path: str | Path) -> list[str]:
    return [t for t in re.split(r"[_\-.\s]+", file_stem(path).lower()) if t]


def classify_path(path: str | Path) -> str | None:
    """What a file name says it holds: a sequence name, ``"labels"``, or None when unknown.

    The last ``_``/``-`` separated token decides (contract 2.2). When the last token is neither a
    sequence nor a label token -- as in scanner exports such as ``TCGA-FG-6692_t1c_raw.nii.gz`` --
    the nearest recognised token before it is used.
    """
    for token in reversed(_name_tokens(path)):
        if token in SEQUENCE_TOKENS:
            return SEQUENCE_TOKENS[token]
        if token in LABEL_TOKENS:
            return "labels"
    return None


def sequence_of(path: str | Path) -> str:
    """The sequence a scan's file name names; raises TumorSegError when it names none."""
    kind = classify_path(path)
    if kind is None or kind == "labels":
        known = ", ".join(sorted(SEQUENCE_TOKENS))
        raise TumorSegError(
            f"unknown sequence name: the file name should end in one of {known} "
            "(e.g. case_t1ce.nii.gz), or pass it with --t1/--t1ce/--t2/--flair",
            path,
        )
    return kind


# --------------------------------------------------------------------------- reading
def _load_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI file and its (scaled) voxel data, turning every failure into TumorSegError."""
    if not path.exists():
        raise TumorSegError("file not found", path)
    if path.is_dir():
        raise TumorSegError("is a folder, not a NIfTI file", path)
    if path.stat().st_size == 0:
        raise TumorSegError("file is empty (0 bytes)", path)
    if not is_nifti_path(path):
        raise TumorSegError("is not a NIfTI file (expected .nii or .nii.gz)", path)
    try:
        image = nib.load(str(path))
    except EOFError:
        raise TumorSegError("file is truncated (it ends inside the NIfTI header)", path) from None
    except gzip.BadGzipFile:
        raise TumorSegError("is not a valid gzip-compressed NIfTI file", path) from None
    except Exception as exc:  # nibabel raises many types for files that are not NIfTI
        raise TumorSegError(f"is not a NIfTI file ({_short(exc)})", path) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise TumorSegError(f"is not a NIfTI file (read as {type(image).__name__})", path)
    try:
        image, buffer = _with_checked_data(image, path)
    except MemoryError:
        raise _no_memory(image, path) from None
    try:
        proxy = image.dataobj
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        # Scaled integers (scl_slope, common in scanner exports) would come back as float64:
        # twice the memory of the float32 the rest of the pipeline uses.
        data = np.asarray(image.get_fdata(dtype=np.float32)) if scaled else np.asanyarray(proxy)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise TumorSegError(
            f"file is truncated or corrupt: the voxel data cannot be read ({_short(exc)})", path
        ) from None
    except (OSError, ValueError) as exc:
        raise TumorSegError(f"the voxel data cannot be read ({_short(exc)})", path) from None
    except MemoryError:
        raise _no_memory(image, path) from None
    finally:
        if buffer is not None:
            buffer.close()  # the decompressed copy: the voxels are read (the header is kept)
    return image, data


def _no_memory(image, path: Path) -> TumorSegError:
    gib = _data_bytes(image.header) / 2**30
    return TumorSegError(f"not enough memory to read its {gib:.1f} GiB of voxels", path)


def _data_bytes(header) -> int:
    """Bytes of voxel data the header announces."""
    voxels = int(np.prod(header.get_data_shape(), dtype=np.float64))
    return voxels * header.get_data_dtype().itemsize


def _with_checked_data(image, path: Path):
    """``(image, buffer)``: ``image`` with its voxel data checked against the header before it
    is read, and the in-memory copy of a decompressed file to close once it is read (or None).

    A header whose dimensions announce more data than the file holds (a truncated file, a
    corrupt header) is refused before memory is allocated for it. A gzip-compressed file is
    decompressed whole here, which checks its CRC: nibabel stops reading at the last voxel, so a
    corrupt stream whose length is right would otherwise be read as garbage voxels. The voxels
    are then read from that copy (decompressed once; the buffer wraps the decompressed bytes
    without copying them).
    """
    needed = int(image.header.get_data_offset()) + _data_bytes(image.header)
    buffer = None
    if not path.name.lower().endswith(".gz"):
        held = path.stat().st_size
    else:
        try:
            raw = _gunzip(path)
        except (EOFError, zlib.error) as exc:
            raise TumorSegError(
                f"file is truncated or corrupt: the voxel data cannot be read ({_short(exc)})",
                path,
            ) from None
        held = len(raw)
        buffer = io.BytesIO(raw)  # shares ``raw``'s memory: nothing writes to it
        del raw
    if held < needed:
        shape = "x".join(map(str, image.header.get_data_shape()))
        raise TumorSegError(
            f"file is truncated or its header is corrupt: the header announces {shape} voxels "
            f"({needed:,} bytes with the header), the file holds {held:,}",
            path,
        )
    if buffer is not None:
        kind = type(image)
        image = kind.from_file_map(kind.make_file_map({"image": buffer, "header": buffer}))
    return image, buffer


def _fast_zlib():
    """A faster drop-in for `zlib`'s decompression where one is installed (the optional
    ``fast`` extra: zlib-ng, then python-isal), else None. Both check the gzip CRC and length
    as zlib does, and release the GIL while they inflate."""
    try:
        from zlib_ng import zlib_ng

        return zlib_ng
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        return isal_zlib
    except ImportError:
        return None


_FAST_ZLIB = _fast_zlib()


def _gunzip(path: Path, chunk: int = 1 << 22) -> bytes:
    """The decompressed content of a gzip file to its end, checking each member's CRC and length
    (zlib raises on a mismatch, EOFError on a cut-off stream). Read in chunks: one read of the
    size a header announces would allocate it at once, whatever the file holds. Bytes after
    the last member that do not start another one (padding some tools leave) are ignored, as
    nibabel ignores them. A file of one chunk and one member (most) is decompressed by one
    call, whose result is returned as it is: no copy.

    With a faster inflater installed (`_fast_zlib`) it decompresses; a file it refuses is
    decompressed again with zlib, so that every error is zlib's, worded as without it."""
    if _FAST_ZLIB is not None:
        try:
            return _gunzip_with(_FAST_ZLIB, path, chunk)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - zlib below says what is wrong, in its own words
            pass
    return _gunzip_with(zlib, path, chunk)


def _gunzip_with(zlib_module, path: Path, chunk: int) -> bytes:
    parts: list[bytes] = []
    with open(path, "rb") as stream:
        decompressor = zlib_module.decompressobj(wbits=31)
        pending = stream.read(chunk)
        while pending:
            parts.append(decompressor.decompress(pending))
            if not decompressor.eof:
                pending = stream.read(chunk)
                continue
            pending = decompressor.unused_data
            if len(pending) < 2:
                pending += stream.read(chunk)
            if pending[:2] != b"\x1f\x8b":  # no further member
                break
            decompressor = zlib_module.decompressobj(wbits=31)
        else:
            if not decompressor.eof:
                raise EOFError("the compressed file ends before its end-of-stream marker")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_in_parallel(calls: list) -> list:
    """The results of ``calls`` (functions without arguments: file reads), run in threads.

    Decompressing and most of NumPy's work release the GIL: on two cores, four scans read in
    about half the time. The outcome is that of calling them in order: the exception of the
    first call that raises (the later ones are not started if they have not begun).
    """
    workers = min(len(calls), os.cpu_count() or 1, 4)
    if workers < 2:
        return [call() for call in calls]
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tumorseg-read")
    try:
        futures = [executor.submit(call) for call in calls]
        return [future.result() for future in futures]
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _check_3d(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:  # e.g. 240x240x155x1x1
        data = data[..., 0]
    if data.ndim == 4:
        raise TumorSegError(
            f"is a 4D NIfTI holding {data.shape[3]} volumes (shape {data.shape}); save each "
            "sequence as its own 3D file (e.g. case_t1.nii.gz, case_flair.nii.gz); a "
            "probability map (one volume per region WT, TC, ET) opens in the viewer",
            path,
        )
    shape = "x".join(map(str, data.shape))
    if data.ndim > 4:
        raise TumorSegError(
            f"is a {data.ndim}D NIfTI (shape {shape}); a 3D MRI volume is needed", path
        )
    if data.ndim < 3 or sum(s > 1 for s in data.shape) < 3:
        raise TumorSegError(
            f"is a 2D image (shape {shape}); a 3D MRI volume with several slices is needed", path
        )
    if min(data.shape) < 3:  # as registration needs
        raise TumorSegError(
            f"has only {min(data.shape)} slices along one axis (shape {shape}); a 3D MRI volume "
            "with at least 3 is needed",
            path,
        )
    return data


def to_brats_labels(data: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Check a label map and return it as uint8 in the BraTS 2018 convention (0, 1, 2, 4).

    Integer values only; BraTS 2023 maps that use 3 for enhancing tumour are mapped to 4.
    """
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise TumorSegError("label map holds NaN or infinite values", path)
        if not np.array_equal(data, np.round(data)):
            raise TumorSegError(
                "label map holds non-integer values; a label map must hold whole numbers "
                "(0 background, 1 NCR/NET, 2 oedema, 4 enhancing tumour)",
                path,
            )
    values = _distinct_values(data)  # whole numbers now, but maybe beyond int64
    unknown = sorted(values - {0, 1, 2, 3, 4})
    if unknown:
        shown = ", ".join(f"{v:.0f}" if abs(v) < 1e15 else f"{v:g}" for v in unknown[:5]) + (
            f", ... ({len(unknown)} values)" if len(unknown) > 5 else ""
        )
        hint = "; is it a scan rather than a label map?" if len(unknown) > 5 else ""
        raise TumorSegError(
            f"label map holds values {shown} outside the BraTS convention "
            f"(0 background, 1 NCR/NET, 2 oedema, 4 enhancing tumour; 3 is read as 4){hint}",
            path,
        )
    if 3 in values and 4 in values:
        raise TumorSegError(
            "label map uses both 3 and 4; it must use either BraTS 2018 (4 = enhancing) or "
            "BraTS 2023 (3 = enhancing) labels",
            path,
        )
    labels = data.astype(np.uint8)
    if 3 in values:
        labels[labels == 3] = 4
    return labels


def _distinct_values(data: np.ndarray) -> set:
    """``set(np.unique(data).tolist())``; for integers within 0..4 (a label map's) from its
    minimum, maximum and a comparison for each value between: a few passes over the voxels
    instead of the hashing or sorting of all of them (a fifth of the time)."""
    if data.dtype.kind in "iu" and data.size:
        low, high = data.min().item(), data.max().item()
        if 0 <= low and high <= 4:
            return {low, high} | {v for v in range(low + 1, high) if (data == v).any()}
    return set(np.unique(data).tolist())


def read_volume(path: str | Path, kind: str | None = None) -> Volume:
    """Read one NIfTI file as a `Volume` reoriented to LPS (Z, Y, X).

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` file.
    kind : {"scan", "labels"} or None
        How to read it; None decides from the file name (`classify_path`) and, for names that
        say nothing, from the data (an integer map with only BraTS values is a label map).

    Returns
    -------
    Volume
        ``name`` is the sequence (``"t1"`` ...), ``"labels"``, or the file stem. Scans keep their
        integer dtype or become float32; label maps are uint8 BraTS labels (0, 1, 2, 4).

    Raises
    ------
    TumorSegError
        Not a NIfTI file, empty or truncated file, 2D or 4D image, NaN/inf voxels, non-integer
        or unknown label values.
    """
    path = Path(path)
    image, data = _load_nifti(path)
    data = _check_3d(data, path)
    named = classify_path(path)
    if kind is None:
        kind = (
            "labels"
            if named == "labels" or (named is None and _looks_like_labels(data))
            else "scan"
        )
    if kind == "labels":
        data = to_brats_labels(data, path)
        name = "labels"
    else:
        if data.dtype.kind == "f":
            if not np.isfinite(data).all():
                bad = int((~np.isfinite(data)).sum())
                raise TumorSegError(f"holds {bad} NaN or infinite voxels", path)
            with np.errstate(over="ignore"):
                single = data.astype(np.float32, copy=False)
            if single is not data and not np.isfinite(single).all():
                raise TumorSegError(
                    f"holds voxel values too large to compute with (up to "
                    f"{np.abs(data).max():g}; float32 goes to 3.4e+38)",
                    path,
                )
            data = single
        elif data.dtype.kind not in "iub":
            raise TumorSegError(f"has an unsupported voxel type {data.dtype}", path)
        name = named if named not in (None, "labels") else file_stem(path)
    _check_affine(image, path)
    return Volume.from_nifti(image, data, name=name, path=path)


def _check_affine(image, path: Path) -> None:
    affine = image.header.get_best_affine()
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise TumorSegError(
            "its header gives no usable voxel-to-world transform (the affine is singular or "
            "not finite): the scan's geometry is unknown",
            path,
        )


def holds_region_maps(path: str | Path) -> bool:
    """Whether a file's header says 4D with one volume per region (WT, TC, ET): what
    ``tumorseg segment --prob`` writes. Reads the header only."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:  # noqa: BLE001 - unreadable files are read_volume's to explain
        return False
    return len(shape) == 4 and shape[3] == len(REGIONS)


def read_probabilities(path: str | Path) -> list[Volume]:
    """The WT, TC and ET probability maps of a 4D file as ``tumorseg segment --prob`` writes
    it, one 3D `Volume` each (named by region), in the file's geometry."""
    path = Path(path)
    image, data = _load_nifti(path)
    if data.ndim != 4 or data.shape[3] != len(REGIONS):
        raise TumorSegError(
            f"is not a probability map (shape {data.shape}; one volume per region "
            f"{', '.join(REGIONS)} expected)",
            path,
        )
    if data.dtype.kind != "f" or not np.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise TumorSegError(
            "holds 3 volumes but not probabilities (values in [0, 1]); save each scan as its "
            "own 3D file",
            path,
        )
    _check_affine(image, path)
    return [
        Volume.from_nifti(image, data[..., c].astype(np.float32), name=region, path=path)
        for c, region in enumerate(REGIONS)
    ]


def read_scan(path: str | Path) -> Volume:
    """`read_volume` of a file that must be a scan: a label map or a mask given as one (a BraTS
    segmentation saved under a sequence's name) is refused instead of being segmented."""
    volume = read_volume(path, kind="scan")
    if not volume.array.any():
        raise TumorSegError("is empty: every voxel is 0", path)
    if _looks_like_labels(volume.array):
        values = ", ".join(str(v) for v in np.unique(volume.array).tolist())
        raise TumorSegError(
            f"holds only the values {values}: a label map or mask, not a scan", path
        )
    return volume


def _looks_like_labels(data: np.ndarray) -> bool:
    if not np.issubdtype(data.dtype, np.integer):
        return False
    # A cheap test on a strided subsample before the full unique().
    sample = np.unique(data[::4, ::4, ::4])
    if len(sample) > 5 or sample.min() < 0 or sample.max() > 4:
        return False
    return _distinct_values(data) <= {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------- exams
@dataclass
class Exam:
    """The scans of one exam (by sequence name) and its label map, if any.

    Attributes
    ----------
    scans : dict[str, Volume]
        Sequence name -> scan, in `SEQUENCES` order.
    labels : Volume or None
        The label map (uint8 BraTS labels) on the grid of one of the scans.
    warnings : list[str]
        Messages for the user about the exam's files: files of the folder that were not read
        (unknown names), scans named after different exams.
    unread_labels : list[Path]
        Label map files of the exam that were not read (``read_exam(read_labels=False)``):
        still the exam's files, which no output may replace.
    """

    scans: dict[str, Volume] = field(default_factory=dict)
    labels: Volume | None = None
    warnings: list[str] = field(default_factory=list)
    name: str = ""
    unread_labels: list[Path] = field(default_factory=list)

    @property
    def reference(self) -> Volume:
        """The scan whose geometry outputs are written in: the first given sequence."""
        return next(iter(self.scans.values()))


def find_exam_files(folder: str | Path) -> tuple[dict[str, Path], list[Path], list[str]]:
    """Sequence files, label files and skip messages of an exam folder, by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TumorSegError("is not a folder", folder)
    scans: dict[str, Path] = {}
    label_files: list[Path] = []
    skipped: list[str] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_path(p)):
        kind = classify_path(path)
        if kind is None:
            skipped.append(f"{path}: unknown sequence name, not opened")
        elif kind == "labels":
            label_files.append(path)
        elif kind in scans:
            raise TumorSegError(
                f"holds two {kind} scans ({scans[kind].name} and {path.name}); keep one", folder
            )
        else:
            scans[kind] = path
    if not scans:
        exams = sorted(
            d.name for d in folder.iterdir() if d.is_dir() and any(map(is_nifti_path, d.iterdir()))
        )
        if exams:
            shown = ", ".join(exams[:3]) + (", ..." if len(exams) > 3 else "")
            raise TumorSegError(
                f"holds exam folders ({shown}), not an exam: open one exam folder at a time",
                folder,
            )
        raise TumorSegError(
            "holds no NIfTI scan named by sequence (t1, t1ce, t2, flair, ...)", folder
        )
    ordered = {s: scans[s] for s in SEQUENCES if s in scans}
    return ordered, label_files, skipped


def read_exam(
    source: str | Path | list[str | Path] | dict[str, str | Path],
    labels: str | Path | None = None,
    read_labels: bool = True,
) -> Exam:
    """Read the scans (and label map) of one exam.

    Parameters
    ----------
    source : folder, list of files, or dict
        A case folder (sequences found by name tokens), a list of files named by sequence, or an
        explicit mapping ``{"t1": path, "flair": path, ...}``. The first given sequence is the
        exam's reference geometry.
    labels : path, optional
        A label map; it must lie on the grid of one of the scans.
    read_labels : bool
        False: a label map in the folder or among the files is not read (segmenting needs
        none; a stale or second one is then no reason to refuse the exam).
    """
    skipped: list[str] = []
    unread: list[Path] = []
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise TumorSegError("no such file or folder", source)
    if isinstance(source, dict):
        unknown = set(source) - set(SEQUENCES)
        if unknown:
            raise TumorSegError(f"unknown sequence(s) {sorted(unknown)}; use {list(SEQUENCES)}")
        files = {k: Path(v) for k, v in source.items() if v is not None}
    elif isinstance(source, (str, Path)) and Path(source).is_dir():
        files, label_files, skipped = find_exam_files(source)
        if not read_labels or labels is not None:
            unread = label_files
        elif len(label_files) > 1:
            names = " and ".join(p.name for p in label_files[:2])
            raise TumorSegError(f"holds two label maps ({names}); keep one", source)
        else:
            labels = label_files[0] if label_files else None
    else:
        paths = [source] if isinstance(source, (str, Path)) else list(source)
        files = {}
        for path in map(Path, paths):
            if path.is_dir():
                raise TumorSegError("give either one case folder or files, not both", path)
            if not path.exists():
                raise TumorSegError("no such file or folder", path)
            kind = classify_path(path)
            if kind == "labels":
                if not read_labels:
                    unread.append(path)
                elif labels is None:
                    labels = path
                else:
                    raise TumorSegError(f"two label maps given ({labels} and {path})", path)
                continue
            seq = sequence_of(path)
            if seq in files:
                raise TumorSegError(f"two {seq} scans given ({files[seq]} and {path})", path)
            files[seq] = path
    if not files:
        if labels is not None:
            raise TumorSegError("no scan given: this file is a label map (by its name)", labels)
        raise TumorSegError("no scan given")
    exam = Exam(warnings=skipped, unread_labels=unread)
    # The scans, then the label map, read side by side (`read_in_parallel`: the same outcome).
    calls = [partial(read_scan, path) for path in files.values()]
    if labels is not None:
        calls.append(partial(read_volume, labels, kind="labels"))
    volumes = read_in_parallel(calls)
    for seq, volume in zip(files, volumes):
        exam.scans[seq] = volume
        exam.scans[seq].name = seq
    exam.name = case_name(next(iter(files.values())))
    # Only names with an exam part before the sequence ("t1.nii.gz" names no exam).
    names = list(
        dict.fromkeys(case_name(p) for p in files.values() if case_name(p) != file_stem(p))
    )
    if len(names) > 1:  # scans of one atlas grid pass every geometry check
        exam.warnings.append(
            f"the scans are named after {len(names)} exams ({', '.join(names)}): check that "
            f"they are one patient's; segmenting them as exam {exam.name}"
        )
    if labels is not None:
        exam.labels = volumes[-1]
        check_grid_match(exam.labels, list(exam.scans.values()), labels)
    return exam


def case_name(path: str | Path) -> str:
    """The exam name in a file name: the stem up to its sequence (or label) token.

    ``Brats18_TCIA01_378_1_t1ce.nii.gz`` -> ``Brats18_TCIA01_378_1``;
    ``TCGA-FG-6692_t1c_raw.nii.gz`` -> ``TCGA-FG-6692``.
    """
    parts = re.split(r"([_\-])", file_stem(path))
    for index in range(len(parts) - 1, -1, -2):
        token = parts[index].lower()
        if token in SEQUENCE_TOKENS or token in LABEL_TOKENS:
            return "".join(parts[: max(index - 1, 0)]) or file_stem(path)
    return file_stem(path)


# --------------------------------------------------------------------------- writing
def creation_mode(path: str | Path, directory: bool = False) -> int:
    """The permissions an atomically replaced ``path`` should get: those of the file it
    replaces, else what ``open`` (or ``mkdir``) would give under the process's umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it to read
    it would briefly change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_IS_A_FOLDER = "is a folder: give a file name for the output"


def check_output_path(path: str | Path, nifti: bool = True) -> Path:
    """``path`` if an output can be written there, else a `TumorSegError` naming it.

    Called before any work, so that a run of minutes does not end in "cannot write": the name
    must be a NIfTI name (``nifti``), not an existing folder, and the nearest existing folder
    above it writable (missing folders are created when the file is written).
    """
    path = Path(path)
    if nifti and not is_nifti_path(path):
        raise TumorSegError("output must end in .nii or .nii.gz", path)
    if path.is_dir():
        raise TumorSegError(_IS_A_FOLDER, path)
    check_can_create(path)
    return path


def _write_target(path: Path) -> Path:
    """The file an output named ``path`` replaces: through a symbolic link, the file it points
    to (the link stays), else ``path``."""
    return path.resolve() if path.is_symlink() and path.exists() else path


def check_can_create(path: str | Path) -> None:
    """A `TumorSegError` naming ``path`` unless it can be created: the nearest existing folder
    above it must be a folder one can write in (missing folders are made on the way)."""
    path = Path(path)
    parent = _write_target(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TumorSegError(f"cannot be written: {parent} is a file, not a folder", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TumorSegError(f"cannot be written: no permission to write in {parent}", path)


def check_outputs_apart(outputs, inputs, inputs_are: str = "the input files") -> None:
    """Refuse outputs that name one file twice, lie inside another output's name, or would
    overwrite one of ``inputs`` (described as ``inputs_are`` in the message)."""
    named = [Path(p) for p in outputs if p is not None]
    resolved = [p.resolve() for p in named]
    if len(set(resolved)) < len(resolved):
        raise TumorSegError("two outputs would be written to the same file", named[0])
    for path, full in zip(named, resolved):
        for other, other_full in zip(named, resolved):
            if other_full in full.parents:
                raise TumorSegError(f"would lie inside {other}, another output file", path)
    sources = {Path(p).resolve() for p in inputs}
    for path, full in zip(named, resolved):
        if full in sources:
            raise TumorSegError(f"is one of {inputs_are}: choose another output", path)


def _write_error(exc: OSError, path: Path) -> TumorSegError:
    return TumorSegError(f"cannot be written ({exc.strerror or exc})", path)


def _staging_prefix(path: Path) -> str:
    """The hidden name a staged file of ``path`` starts with. Short: the name must stay within
    the 255 bytes a file name may have."""
    return f".{path.name[:64]}."


class OutputFiles:
    """Files written as one output: each is written to a temporary file beside its target, and
    only when every one was written are they renamed over their targets.

    A failure in between (a full disk, a folder without write permission, an error in the
    next step) leaves every target as it was -- an existing label map is never replaced while
    its probability map, or a registration's transform, could not be written::

        with OutputFiles() as outputs:
            write_labels(out, labels, like, outputs=outputs)
            write_volume(prob_out, probabilities, like, outputs=outputs)
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, path: str | Path) -> Path:
        """A new temporary file beside ``path`` (same suffix) to write ``path``'s content to."""
        path = _write_target(Path(path))
        suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=suffix, dir=path.parent)
        except OSError as exc:
            raise _write_error(exc, path) from None
        os.close(fd)
        self._staged.append((Path(tmp), path))
        return Path(tmp)

    @staticmethod
    def leftovers(path: str | Path) -> list[Path]:
        """Staging files of ``path`` left behind by a process killed while writing it (a
        `stage` whose commit or discard never came)."""
        path = Path(path)
        if not path.parent.is_dir():
            return []
        return sorted(path.parent.glob(f"{glob.escape(_staging_prefix(path))}*"))

    def write_text(self, path: str | Path, text: str) -> Path:
        """Stage ``text`` (UTF-8) as the new content of ``path``; returns ``path``."""
        try:
            self.stage(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise _write_error(exc, Path(path)) from None
        return Path(path)

    def commit(self) -> None:
        """Rename every staged file over its target."""
        staged, self._staged = self._staged, []
        folders = [path for _, path in staged if path.is_dir()]
        if folders:  # the one failure a rename would meet halfway through: check before any
            self._staged = staged
            self.discard()
            raise TumorSegError(_IS_A_FOLDER, folders[0])
        try:
            for tmp, path in staged:
                # mkstemp creates the file readable by its owner only; the rename would keep that.
                fsync_path(tmp)  # on disk before it replaces the user's file, even on a power cut
                os.chmod(tmp, creation_mode(path))
                os.replace(tmp, path)
        except OSError as exc:
            self._staged = staged
            self.discard()
            raise _write_error(exc, path) from None

    def discard(self) -> None:
        """Delete the staged files that were not renamed; the targets stay as they were."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def fsync_path(path: str | Path) -> None:
    """Flush a written file, or a folder's entries (renames), to disk (`os.fsync`; Windows
    needs a file open for writing and opens no folder). Only durability is at stake: what the
    system or file system cannot sync (some network or FUSE ones) is let be."""
    path = Path(path)
    folder = path.is_dir()
    try:
        fd = os.open(path, (os.O_RDONLY if folder else os.O_RDWR) | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if not folder and exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise


def write_volume(
    path: str | Path,
    array: np.ndarray,
    like: Volume,
    dtype=None,
    outputs: OutputFiles | None = None,
) -> Path:
    """Write a (Z, Y, X) or (C, Z, Y, X) array in the geometry of ``like`` (its source file's
    grid; channels become the 4th NIfTI dimension), atomically.

    The file is first written next to the target and then renamed over it, so an existing file is
    never left half-written; with ``outputs`` the rename waits for the other files of the same
    output (`OutputFiles`).
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise TumorSegError("output must end in .nii or .nii.gz", path)
    if tuple(array.shape[-3:]) != like.spatial_shape or array.ndim not in (3, 4):
        raise TumorSegError(
            f"array of shape {array.shape} does not lie on the grid of {like.name} "
            f"({like.spatial_shape})",
            path,
        )
    if outputs is None:
        with OutputFiles() as outputs:
            return write_volume(path, array, like, dtype=dtype, outputs=outputs)
    image = like.to_nifti(array, dtype=dtype)
    tmp = outputs.stage(path)
    try:
        nib.save(image, tmp)
    except OSError as exc:
        raise _write_error(exc, path) from None
    return path


def write_labels(
    path: str | Path, labels: np.ndarray, like: Volume, outputs: OutputFiles | None = None
) -> Path:
    """Write a BraTS label map (Z, Y, X) in the geometry of the scan ``like`` (`write_volume`)."""
    labels = np.asarray(labels)
    dtype = np.uint8 if labels.min(initial=0) >= 0 and labels.max(initial=0) < 256 else np.int32
    return write_volume(path, labels, like, dtype=dtype, outputs=outputs)
