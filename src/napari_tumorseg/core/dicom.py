"""DICOM import: the MR series of a study folder, each read to a `Volume` in LPS, as the NIfTI
reader gives them (issue 24, first part: finding, recognising and reading series; the napari
reader and the CLI come next).

Series are found and read with SimpleITK's GDCM series reader: it sorts a series' files along
the slice normal by ImagePositionPatient, applies RescaleSlope/Intercept, and keeps an oblique
ImageOrientationPatient exactly. Before a series is read, its slice positions are checked: equal
steps along the normal, one orientation, one slice size -- a missing slice or a mixed folder is
one clear error naming the series, never a volume with the wrong geometry.

Sequences (t1, t1ce, t2, flair) are recognised from SeriesDescription and ProtocolName.
Localisers, secondary captures and non-MR series are left out, with the reason said.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TumorSegError
from .io import SEQUENCES, Exam, is_nifti_path, read_exam
from .volume import Volume

#: Tags read from each series' first file (group|element, as SimpleITK names them).
TAGS = {
    "description": "0008|103e",
    "protocol": "0018|1030",
    "modality": "0008|0060",
    "image_type": "0008|0008",
    "orientation": "0020|0037",
    "position": "0020|0032",
    "rows": "0028|0010",
    "columns": "0028|0011",
}
#: Relative tolerance of the steps between slice positions along the normal.
STEP_TOLERANCE = 0.01

# Words in descriptions are delimited by anything but a letter or digit ("t2_tirm_tra").
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"


def _words(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"{_B}(?:{p}){_E}" for p in patterns), re.I)


_LOCALISER = _words(r"locali[sz]er", "scout", "survey", "loc", r"3[- ]?plane")
_FLAIR = _words("flair", r"dark[- ]?fluid", "tirm")
_T2 = _words("t2", r"t2[- ]?w", "t2 ?(?:tse|fse)")
_T1 = _words("t1", r"t1[- ]?w", "t1n", "t1c", "t1ce", "t1 ?gd", r"mp[- ]?rage", "spgr", "bravo")
_CONTRAST = _words(
    r"post", r"contrast", r"\+ ?c", "gd", r"gado\w*", "ce", "t1c", "t1ce", r"c\+", "pc"
)


@dataclass
class Series:
    """One DICOM series of a study: its files (in GDCM's order) and what its first file says."""

    uid: str
    files: list[str]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.tags.get("description") or self.tags.get("protocol") or self.uid

    @property
    def label(self) -> str:
        """How the series is named to a user: its description and file count."""
        return f"{self.description!r} ({len(self.files)} files, series {self.uid[-8:]})"


def find_series(folder: str | Path) -> list[Series]:
    """Every DICOM series under ``folder`` (its sub-folders too), in folder order."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise TumorSegError("is not a folder of DICOM files", folder)
    found: list[Series] = []
    for root, dirs, _ in os.walk(folder):
        dirs.sort()
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid))
            if files:
                found.append(Series(uid=uid, files=files, tags=_first_tags(files[0])))
    return found


def _first_tags(path: str) -> dict[str, str]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise TumorSegError(f"cannot be read as DICOM ({_first_line(exc)})", path) from None
    return {
        name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
        for name, tag in TAGS.items()
    }


def left_out(series: Series) -> str | None:
    """Why a series is not a scan to segment (a localiser, a secondary capture, not MR, too
    few slices), or None."""
    tags = series.tags
    image_type = tags.get("image_type", "").upper()
    modality = tags.get("modality", "").upper()
    if modality and modality != "MR":
        return f"not MR ({modality})"
    if "LOCALIZER" in image_type or _LOCALISER.search(series.description):
        return "a localiser"
    if any(kind in image_type for kind in ("SCREEN SAVE", "MPR", "PROJECTION", "REFORMATTED")):
        return f"derived ({image_type.replace(chr(92), ' ').lower()})"
    if len(series.files) < 3:
        return f"{len(series.files)} slice(s), not a volume"
    return None


def sequence_of(series: Series) -> str | None:
    """t1, t1ce, t2 or flair, from the series' description and protocol name; None when they
    do not say."""
    text = " ".join(filter(None, (series.tags.get("description"), series.tags.get("protocol"))))
    if _FLAIR.search(text):
        return "flair"
    if _T2.search(text):
        return "t2"
    if _T1.search(text):
        return "t1ce" if _CONTRAST.search(text) else "t1"
    return None


def read_series(series: Series, name: str | None = None) -> Volume:
    """One series as a `Volume` (LPS, (Z, Y, X)), after checking its slices form one regular
    volume."""
    import SimpleITK as sitk

    _check_slices(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise TumorSegError(
            f"series {series.label} cannot be read ({_first_line(exc)}): a compressed transfer "
            "syntax SimpleITK cannot decode, or damaged files",
            Path(series.files[0]).parent,
        ) from None
    return Volume.from_sitk(image, name=name or sequence_of(series) or series.description)


def _check_slices(series: Series) -> None:
    """Equal steps between slice positions along the normal, one orientation, one size."""
    import SimpleITK as sitk

    folder = Path(series.files[0]).parent
    positions, orientations, sizes = [], set(), set()
    for path in series.files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise TumorSegError(f"cannot be read as DICOM ({_first_line(exc)})", path) from None
        get = reader.GetMetaData
        has = reader.HasMetaDataKey
        if not (has(TAGS["position"]) and has(TAGS["orientation"])):
            raise TumorSegError(
                f"series {series.label}: a file has no ImagePositionPatient or "
                "ImageOrientationPatient, so its geometry is unknown",
                path,
            )
        positions.append([float(v) for v in get(TAGS["position"]).split("\\")])
        orientations.add(tuple(round(float(v), 4) for v in get(TAGS["orientation"]).split("\\")))
        sizes.add(reader.GetSize()[:2])
    if len(orientations) > 1 or len(sizes) > 1:
        raise TumorSegError(
            f"series {series.label} mixes slices of {len(orientations)} orientations and "
            f"{len(sizes)} sizes: one series per volume",
            folder,
        )
    row, column = np.asarray(next(iter(orientations))).reshape(2, 3)
    normal = np.cross(row, column)
    along = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(along)
    if len(steps) == 0:
        return
    if np.any(steps < 1e-3):
        raise TumorSegError(
            f"series {series.label} has two slices at the same position: one series per "
            "volume (a folder mixing series or repeated acquisitions?)",
            folder,
        )
    typical = float(np.median(steps))
    if np.any(np.abs(steps - typical) > STEP_TOLERANCE * typical):
        gaps = int(np.sum(steps > (1 + STEP_TOLERANCE) * typical))
        raise TumorSegError(
            f"series {series.label} has unequal slice spacing ({steps.min():.2f} to "
            f"{steps.max():.2f} mm"
            + (f"; {gaps} gap(s): missing slices?" if gaps else "")
            + "): it cannot be read as one regular volume",
            folder,
        )


class SeriesChoiceNeeded(TumorSegError):
    """A study whose series cannot be told apart without the user: a sequence found in more
    than one series, or series not recognised while sequences are missing. The message lists
    the series (for the CLI); ``candidates`` and ``guesses`` (series uid -> recognised
    sequence or None) let a GUI ask, then `read_dicom_exam` take ``choice``."""

    def __init__(self, problem: str, folder: Path, candidates: list[Series]) -> None:
        lines = [f"{sequence_of(s) or 'unrecognised'}: {s.label}" for s in candidates]
        super().__init__(
            f"{problem}; choose the series to use. The series: " + "; ".join(lines), folder
        )
        self.reason = problem
        self.folder = folder
        self.candidates = candidates
        self.guesses = {s.uid: sequence_of(s) for s in candidates}


def read_dicom_exam(
    folder: str | Path, name: str | None = None, choice: dict[str, str] | None = None
) -> Exam:
    """The four sequences of a DICOM study folder as an `Exam`.

    Series that are not scans (`left_out`) are left out and said so in the exam's warnings. A
    sequence found in more than one series, or a series whose sequence is not recognised while
    a sequence is missing, is a `SeriesChoiceNeeded` listing the series, so that the user
    picks: ``choice`` (sequence -> series uid) is that pick, read as it says.
    """
    folder = Path(folder)
    series = find_series(folder)
    if not series:
        raise TumorSegError("holds no DICOM series", folder)
    warnings, candidates = [], []
    for s in series:
        why = left_out(s)
        if why:
            warnings.append(f"series {s.label} left out: {why}")
        else:
            candidates.append(s)
    if choice is not None:
        return _chosen(folder, name, candidates, choice, warnings)
    by_sequence: dict[str, list[Series]] = {}
    unknown = []
    for s in candidates:
        sequence = sequence_of(s)
        (by_sequence.setdefault(sequence, []) if sequence else unknown).append(s)
    ambiguous = {k: v for k, v in by_sequence.items() if len(v) > 1}
    missing = [s for s in SEQUENCES if s not in by_sequence]
    if ambiguous or (unknown and missing) or not by_sequence:
        problem = (
            f"more than one series for {', '.join(sorted(ambiguous))}"
            if ambiguous
            else "no series recognised as t1, t1ce, t2 or flair"
            if not by_sequence
            else f"{', '.join(missing)} not recognised among the series"
        )
        raise SeriesChoiceNeeded(problem, folder, candidates)
    for s in unknown:
        warnings.append(f"series {s.label} left out: not recognised as a sequence")
    scans = {
        seq: read_series(by_sequence[seq][0], name=seq) for seq in SEQUENCES if seq in by_sequence
    }
    return Exam(scans=scans, name=name or folder.name, warnings=warnings)


def _chosen(folder, name, candidates, choice, warnings) -> Exam:
    """The exam of the series the user chose (sequence -> series uid)."""
    by_uid = {s.uid: s for s in candidates}
    unknown = [uid for uid in choice.values() if uid not in by_uid]
    if unknown or not choice:
        raise TumorSegError(f"no such series among the study's scans: {', '.join(unknown)}", folder)
    if len(set(choice.values())) < len(choice):
        raise TumorSegError("one series was chosen for two sequences", folder)
    chosen = set(choice.values())
    warnings += [
        f"series {s.label} left out: not chosen" for s in candidates if s.uid not in chosen
    ]
    scans = {seq: read_series(by_uid[choice[seq]], name=seq) for seq in SEQUENCES if seq in choice}
    return Exam(scans=scans, name=name or folder.name, warnings=warnings)


def holds_dicom(folder: str | Path, look_at: int = 64) -> bool:
    """Whether ``folder`` (or a sub-folder) holds DICOM files: the "DICM" mark after the
    128-byte preamble, in the first ``look_at`` files seen."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            seen += 1
            try:
                with open(os.path.join(root, name), "rb") as handle:
                    if handle.read(132)[128:] == b"DICM":
                        return True
            except OSError:
                pass
            if seen >= look_at:
                return False
    return False


def read_case(
    folder: str | Path, read_labels: bool = True, choice: dict[str, str] | None = None
) -> Exam:
    """A case folder of either kind: NIfTI files (`io.read_exam`), or a DICOM study
    (`read_dicom_exam`, with the user's ``choice`` of series if any) when it holds no NIfTI
    file and DICOM files."""
    folder = Path(folder)
    if (
        folder.is_dir()
        and not any(is_nifti_path(p) for p in folder.iterdir())
        and holds_dicom(folder)
    ):
        return read_dicom_exam(folder, choice=choice)
    return read_exam(folder, read_labels=read_labels)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
