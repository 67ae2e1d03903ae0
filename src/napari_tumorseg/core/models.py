"""Models: safetensors weights + a JSON model card; bundled and user (fine-tuned) versions.

Layout (contract 2.4)::

    <package>/weights/<name>/model.safetensors, card.json          bundled ("3d", "2d")
    <user data dir>/models/<name>/v<k>/model.safetensors, card.json  user versions

An "adapt to this exam" version also holds ``exam_head.safetensors``: the head fitted on that
exam's corrections (`refine`), described by the card's ``exam_head`` entry.

Nothing is unpickled: weights are safetensors, the card is JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .bundled import BUNDLED, DEFAULT_MODEL
from .errors import TumorSegError
from .io import check_can_create, creation_mode
from .unet import build_network

WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "exam_head.safetensors"
CARD_FILE = "card.json"
REQUIRED_CARD_KEYS = (
    "name",
    "version",
    "spatial_dims",
    "channels",
    "regions",
    "patch_size",
    "spacing_mm",
    "normalization",
    "parent",
    "metrics",
    "architecture",
)


@dataclass
class TumorModel:
    """A loaded model.

    Attributes
    ----------
    network : torch.nn.Module
        (B, 4, *spatial) normalised input -> (B, 3, *spatial) logits (WT, TC, ET), in eval mode.
    card : dict
        The model card (patch size, spacing, normalisation, metrics, parent, ...).
    path : Path
        The folder the model was loaded from.
    head : refine.ExamHead or None
        The exam head of an "adapt to this exam" version (card ``exam_head``), applied by
        `inference.segment` to that exam only.
    """

    network: torch.nn.Module
    card: dict
    path: Path
    head: torch.nn.Module | None = None

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def label(self) -> str:
        """``name`` for bundled models, ``name@v<k>`` for user versions."""
        return (
            self.card["name"]
            if self.card.get("parent") is None
            else (f"{self.card['name']}@v{self.card['version']}")
        )


def bundled_dir() -> Path:
    """Folder of the bundled models inside the package."""
    return Path(__file__).resolve().parent.parent / "weights"


def user_models_dir() -> Path:
    """Folder of the user's fine-tuned models (``TUMORSEG_USER_DIR`` overrides it)."""
    root = os.environ.get("TUMORSEG_USER_DIR")
    if root is None:
        from platformdirs import user_data_dir

        root = user_data_dir("napari-tumorseg", appauthor=False)
    return Path(root) / "models"


def _read_card(folder: Path) -> dict:
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TumorSegError(f"model card cannot be read ({exc})", folder / CARD_FILE) from None
    if not isinstance(card, dict):
        raise TumorSegError(
            f"model card is not a JSON object (it holds {type(card).__name__})", folder / CARD_FILE
        )
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise TumorSegError(f"model card lacks {missing}", folder / CARD_FILE)
    if card["spatial_dims"] not in (2, 3):
        raise TumorSegError(
            f"model card says spatial_dims={card['spatial_dims']!r}; expected 2 or 3",
            folder / CARD_FILE,
        )
    return card


def _user_versions(name: str) -> list[Path]:
    folder = user_models_dir() / name
    if not folder.is_dir():
        return []
    versions = [
        p
        for p in folder.iterdir()
        if p.is_dir()
        and p.name[1:].isdigit()
        and p.name.startswith("v")
        and (p / CARD_FILE).exists()
    ]
    return sorted(versions, key=lambda p: int(p.name[1:]))


def model_folder(name: str) -> Path:
    """Folder of a model: ``"3d"``/``"2d"`` (bundled), ``NAME`` (latest user version) or
    ``NAME@v<k>`` (that version)."""
    if name in BUNDLED:
        folder = bundled_dir() / name
        if not (folder / WEIGHTS_FILE).exists():
            raise TumorSegError(
                f"the bundled {name} model is not installed (no {WEIGHTS_FILE})", folder
            )
        return folder
    base, _, version = name.partition("@")
    # A name, never a path: "../x" or "/abs/x" would leave the user models folder.
    versions = [] if any(c in base for c in "/\\") or base.startswith(".") else _user_versions(base)
    if not versions:
        known = ", ".join([*BUNDLED, *(m["label"] for m in list_models() if m.get("parent"))])
        raise TumorSegError(f"no model named {name!r}; known models: {known}")
    if not version:
        return versions[-1]
    for folder in versions:
        if folder.name == version.lower() or folder.name == f"v{version}":
            return folder
    raise TumorSegError(f"model {base!r} has no version {version!r}")


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device = "cpu") -> TumorModel:
    """Load a bundled or user model by name (contract 2.5).

    Parameters
    ----------
    name : str
        ``"2d"`` (`DEFAULT_MODEL`), ``"3d"``, a user model's name (its latest version) or
        ``NAME@v<k>``.
    device : str or torch.device
        Where to put the network; weights stored in float16 are loaded as float32.
    """
    folder = model_folder(name)
    card = _read_card(folder)
    if name not in BUNDLED:
        # Named by its folder, which is how it is found: a renamed model folder keeps working
        # (segmentations record this label, and a fine-tune loads its parent by it).
        card = {**card, "name": folder.parent.name, "version": int(folder.name[1:])}
    return load_model_folder(folder, device, card)


def load_model_folder(
    folder: Path, device: str | torch.device = "cpu", card: dict | None = None
) -> TumorModel:
    """A model from its folder (card and weights), e.g. a cross-validation fold's model;
    ``card``: the folder's card as `load_model` names it (default: read from the folder)."""
    folder = Path(folder)
    card = _read_card(folder) if card is None else card
    try:
        with torch.device("meta"):  # no random initialisation: the weights replace it
            network = build_network(card["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TumorSegError(
            f"the card's architecture cannot be built ({_one_line(exc)})", folder / CARD_FILE
        ) from None
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise TumorSegError(
            f"model weights cannot be read ({exc})", folder / WEIGHTS_FILE
        ) from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        network.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise TumorSegError(
            f"weights do not fit the card's architecture ({_one_line(exc)})", folder / WEIGHTS_FILE
        ) from None
    network.to(device).eval()
    head = _load_head(folder, card["exam_head"]) if card.get("exam_head") else None
    return TumorModel(network=network, card=card, path=folder, head=head)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut at ``limit`` characters (torch's state-dict
    errors list every mismatched tensor on its own line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_head(folder: Path, entry) -> torch.nn.Module:
    from .refine import ExamHead

    try:
        head = ExamHead(int(entry["features"]), int(entry["hidden"]))
        if not all(isinstance(entry[key], str) for key in ("exam", "fingerprint")):
            raise TypeError("exam and fingerprint must be strings")  # `inference.segment`
        anchors = entry.get("anchors", [])
        if not isinstance(anchors, list) or not all(
            isinstance(a, list) and len(a) == 3 and all(type(i) is int for i in a) for a in anchors
        ):
            raise TypeError("anchors must be a list of [z, y, x] voxel indices")
    except (KeyError, TypeError, ValueError) as exc:
        raise TumorSegError(
            f"the card's exam_head entry is incomplete or malformed ({exc!r})", folder / CARD_FILE
        ) from None
    try:
        head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    except Exception as exc:  # missing or corrupt file, or one that does not fit the card
        raise TumorSegError(f"the exam head cannot be read ({exc})", folder / HEAD_FILE) from None
    return head.eval().requires_grad_(False)


def save_model(
    network: torch.nn.Module,
    card: dict,
    folder: str | Path,
    half: bool = False,
    head: torch.nn.Module | None = None,
) -> Path:
    """Write weights, card (and an exam head) into ``folder`` atomically (a temporary folder
    renamed into place).

    An existing folder is replaced only once the new one is complete.
    """
    folder = Path(folder)
    card = {**card, "architecture": dict(getattr(network, "config", card.get("architecture")))}
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {
            k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in network.state_dict().items()
        }
        save_file(state, str(tmp / WEIGHTS_FILE))
        if head is not None:
            head_state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
            save_file(head_state, str(tmp / HEAD_FILE))
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2))
        os.chmod(tmp, creation_mode(folder, directory=True))  # mkdtemp: owner only
        if folder.is_dir() and not any(folder.iterdir()):
            # An empty claim (`save_user_model`): replaced in one rename, so that no other save
            # can claim the number in between (POSIX; Windows renames onto no folder, and
            # there the claim is given up just before the rename).
            try:
                os.replace(tmp, folder)
            except OSError:
                folder.rmdir()
                os.replace(tmp, folder)
        elif folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


#: Longest user model name: a folder name, well within every file system's limit.
MAX_NAME = 100


def check_model_name(name: str) -> str:
    """``name`` if it can name a user model, else a `TumorSegError` saying why."""
    if (
        not name
        or any(c in name for c in "/\\@")
        or name in BUNDLED
        or name.startswith(".")
        or "\0" in name
        or len(os.fsencode(name)) > MAX_NAME  # bytes: what a file system's limit counts
    ):
        raise TumorSegError(
            f"{name!r} is not a valid model name (at most {MAX_NAME} bytes -- fewer characters "
            "outside ASCII --, no / \\ @, not starting with '.'; not 3d or 2d)"
        )
    return name


def check_can_save(name: str) -> str:
    """``name`` if a new version of user model ``name`` can be saved (a valid name, a user
    models folder that can be written), else a `TumorSegError`: checked before training."""
    check_model_name(name)
    check_can_create(user_models_dir() / name / "v1")
    return name


def save_user_model(
    network: torch.nn.Module, card: dict, name: str, head: torch.nn.Module | None = None
) -> Path:
    """Save a new version of user model ``name``; returns its folder (``.../name/v<k>``)."""
    check_model_name(name)
    base = user_models_dir() / name
    base.mkdir(parents=True, exist_ok=True)
    versions = _user_versions(name)
    version = int(versions[-1].name[1:]) + 1 if versions else 1
    while True:
        folder = base / f"v{version}"
        try:
            # Claims the number: a version saved at the same time (another viewer, the CLI)
            # or a leftover folder without a card takes the next one instead of being replaced.
            folder.mkdir()
            break
        except FileExistsError:
            version += 1
    try:
        return save_model(network, {**card, "name": name, "version": version}, folder, head=head)
    except BaseException:
        with contextlib.suppress(OSError):
            folder.rmdir()  # the empty claim; save_model replaces it only once complete
        raise


def learnt_from(card: dict, latest: int | None = None) -> str:
    """One line saying what a model learnt from: the training exams of a bundled model, the
    corrected exams and slices of a fine-tuned version (its card's ``lineage``, oldest
    first; only the ``latest`` rounds when given), for the Segment dock and
    ``tumorseg models``."""
    lineage = card.get("lineage") or []
    if not lineage:
        exams = (card.get("training") or {}).get("train_exams") or []
        return f"trained on {len(exams)} expert-labelled exams" if exams else ""
    root = lineage[0].get("parent", "?")
    exams = list(dict.fromkeys(entry.get("exam", "?") for entry in lineage))
    shown = lineage if latest is None else lineage[-latest:]
    hidden = len(lineage) - len(shown)
    parts = [f"{hidden} earlier round{'s' if hidden != 1 else ''}"] if hidden else []
    for entry in shown:
        slices = entry.get("corrected_slices")
        where = (
            "every slice"
            if slices == "all"
            else f"slice{'s' if len(slices or []) != 1 else ''} "
            + ", ".join(str(z) for z in slices or [])
        )
        parts.append(f"{entry.get('exam', '?')} ({entry.get('mode', '?')}, {where})")
    return f"{root} fine-tuned on {len(exams)} exam{'s' if len(exams) != 1 else ''}: " + "; ".join(
        parts
    )


def list_models(problems: list[str] | None = None) -> list[dict]:
    """Cards of the bundled models present and of every user model version, with ``label``.

    A model whose card cannot be read is left out, so that one broken folder does not hide the
    others; its message (naming the file) is appended to ``problems`` when given.
    """
    found = [(name, bundled_dir() / name) for name in BUNDLED]
    found = [(label, folder) for label, folder in found if (folder / WEIGHTS_FILE).exists()]
    root = user_models_dir()
    if root.is_dir():
        for model in sorted(p for p in root.iterdir() if p.is_dir()):
            found += [(f"{model.name}@{f.name}", f) for f in _user_versions(model.name)]
    cards = []
    for label, folder in found:
        try:
            card = _read_card(folder)
            if not (folder / WEIGHTS_FILE).is_file():
                raise TumorSegError(f"no weights ({WEIGHTS_FILE} is missing)", folder)
        except TumorSegError as exc:
            if problems is not None:
                problems.append(str(exc))
            continue
        cards.append({**card, "label": label, "path": str(folder)})
    return cards
