"""What a MONAI user would write to segment one exam with a bundled network: the baseline of
`bench_process.py`.

    python benchmarks/_monai_segment.py EXAM_DIR OUT.nii.gz --model 2d [--crop] [--threads 2]

The same network and weights (the model folder's card and safetensors), the same spacing (the
card's), the same thresholds (the card's), and MONAI's inferers: `SliceInferer` over every axial
slice of the whole volume for a 2D model, `sliding_window_inference` over the whole volume for a
3D one (the card's window, overlap 0.5, Gaussian blending, 2 windows per batch). The scans are
read with nibabel, z-scored over their non-zero voxels channel by channel (MONAI's
`NormalizeIntensity(nonzero=True, channel_wise=True)`), and the label map is written with the
first scan's affine. float32 throughout: MONAI's default, and the only arithmetic of a CPU
without native bfloat16. No post-processing beyond the thresholds. With ``--crop`` the volume
is first cut to the box of its non-zero voxels (MONAI's `CropForeground`, as nnU-Net crops)
and the map put back in place: fewer slices and windows, as the plugin's brain box.

The network takes (z, y, x) volumes, as the plugin reads them; nibabel gives (x, y, z), so the
arrays are transposed both ways.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import SliceInferer, sliding_window_inference
from monai.transforms import CropForeground, DivisiblePad, NormalizeIntensity, Resize
from safetensors.torch import load_file

import napari_tumorseg
from napari_tumorseg.core.unet import build_network

SEQUENCES = ("t1", "t1ce", "t2", "flair")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exam", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="2d")
    parser.add_argument("--crop", action="store_true", help="cut to the non-zero box first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(napari_tumorseg.__file__).parent / "weights" / args.model
    card = json.loads((folder / "card.json").read_text())
    network = build_network(card["architecture"])
    state = load_file(str(folder / "model.safetensors"))
    network.load_state_dict({k: v.float() for k, v in state.items()})
    network.eval()

    scans = [nib.load(next(args.exam.glob(f"*_{s}.nii*"))) for s in SEQUENCES]
    image = np.stack([np.asarray(s.dataobj, dtype=np.float32) for s in scans])
    image = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 2, 1)))  # (C, z, y, x)
    whole = image.shape[1:]
    box = (slice(None),) * 3
    if args.crop:
        cropper = CropForeground(select_fn=lambda x: x > 0)
        start, end = cropper.compute_bounding_box(image)
        box = tuple(slice(int(a), int(b)) for a, b in zip(start, end))
        image = image[(slice(None), *box)]
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    spacing = [float(z) for z in scans[0].header.get_zooms()[:3]][::-1]
    shape = image.shape[1:]
    target = [round(n * s / m) for n, s, m in zip(shape, spacing, card["spacing_mm"])]
    if list(target) != list(shape):
        image = Resize(target, mode="trilinear")(image)

    with torch.inference_mode():
        if card["spatial_dims"] == 2:
            pad = DivisiblePad(k=network.divisor)
            padded = pad(image)
            inferer = SliceInferer(
                roi_size=tuple(padded.shape[2:]), sw_batch_size=16, spatial_dim=0
            )
            logits = pad.inverse(inferer(padded[None], network)[0])
        else:
            logits = sliding_window_inference(
                image[None],
                tuple(card["patch_size"]),
                2,
                network,
                overlap=0.5,
                mode="gaussian",
            )[0]
        probabilities = torch.sigmoid(torch.as_tensor(logits))
    if list(target) != list(shape):
        probabilities = Resize(list(shape), mode="trilinear")(probabilities)
    probabilities = np.asarray(probabilities)

    wt, tc, et = card.get("postprocess", {}).get("thresholds", [0.5, 0.5, 0.5])
    labels = np.zeros(whole, dtype=np.uint8)
    inside = labels[box]
    inside[probabilities[0] > wt] = 2
    inside[probabilities[1] > tc] = 1
    inside[probabilities[2] > et] = 4
    labels = labels.transpose(2, 1, 0)  # back to nibabel's (x, y, z)
    nib.save(nib.Nifti1Image(labels, scans[0].affine), args.out)


if __name__ == "__main__":
    main()
