"""The shipped model's masks, pinned: the sample's test slices, the same slices stacked into a
NIfTI volume, and that volume written as a DICOM series, predicted by ``tumorseg-predict`` with
its defaults. A change of structure (modules moved, configs rewired) must leave every mask bit
for bit as it was; a change of model or post-processing updates ``PINNED`` on purpose.

    python tests/test_pinned_masks.py    # prints the digests of the current code
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "brain-tumor-coco-sample"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm voxels, the first axis to the patient's left

# sha256 of (shape, uint8 mask bytes) per output; made with bundle 0.7.1 before the move to src/
PINNED = {
    "1072_jpg.rf.45310adc3a3055067e841021aa27fd36_seg.png": "371ff3a33c2a071044d8f8cefd0514303a3c6d5d39bf22683d9501d841ed2a4d",
    "1341_jpg.rf.c549bea8f488b4c02da3d56673852e13_seg.png": "b327fa0f6f7ce61f1cecbbeff2f8efd651e496dbe0ba93491643e0bd4f6e906c",
    "1574_jpg.rf.bc3829cdc8a483e344f67a9bd4d6fa84_seg.png": "2316cbcbceef2d0108e6a52f0f81b9966ddbdd488986767e299cf81aa644db90",
    "179_jpg.rf.20611fb45e6fc335f2c6e05d884fb29a_seg.png": "806caa741907166dce6244d04d061733aa36199b6567e7a4c3e41eb9c9928f5f",
    "2035_jpg.rf.2fc263f392353f310daca7f08f1fe679_seg.png": "0c03ac1b91af7f61653c848dc2d94c53751aa8220a35327b2eb03fa27cf058c7",
    "2295_jpg.rf.6c550f0874cb0b2e0aaf14bd025c4162_seg.png": "bff2701eed54e3dda741c7f60f63c611cd4dae890c029a325146ba69f4378674",
    "2541_jpg.rf.252879ecf87cd0534d78a02813dd0a68_seg.png": "bf59c9e13d095373d7223a8935a8c04e77fc12c5e862e47afe841b0627d3e7fe",
    "2741_jpg.rf.664933debd3a457cdbfbd3f9ee8d0268_seg.png": "0d6457ba26c99d198c637cd11170aea9be82e9fd79f37999a025cfb35fe28cc4",
    "series_seg.dcm": "be6861bb713e4cdd2a0db4a6464ee65c4753e4694f5931f114eebddb4d13fd55",
    "series_seg.nii.gz": "93eae4bed6d53b30ecc21f0f51aa245df5939b274216c9835bbfe3f4acab0be8",
    "stack_seg.nii.gz": "93eae4bed6d53b30ecc21f0f51aa245df5939b274216c9835bbfe3f4acab0be8",
}


def inputs(folder: Path) -> list[Path]:
    """The sample's test slices, their stack as NIfTI (``stack.nii.gz``) and as DICOM (``series/``)."""
    import nibabel as nib
    from PIL import Image

    from data_tools.nifti_to_dicom import write_series

    slices = sorted((SAMPLE / "test").glob("*.jpg"))
    xy = [np.asarray(Image.open(p).convert("L"), dtype=np.float32).T for p in slices]
    volume = np.stack(xy, axis=-1)
    nib.save(nib.Nifti1Image(volume, LPS), folder / "stack.nii.gz")
    write_series(volume, LPS, folder / "series", shuffle_names=False)
    return [*slices, folder / "stack.nii.gz", folder / "series"]


def mask_digests(out: Path) -> dict[str, str]:
    """sha256 of each predicted mask's shape and values, by output name."""
    import nibabel as nib
    from PIL import Image

    digests = {}
    for path in sorted(out.iterdir()):
        if path.name.endswith("_seg.png"):
            mask = np.asarray(Image.open(path))
        elif path.name.endswith("_seg.nii.gz"):
            mask = np.asarray(nib.load(path).dataobj)
        elif path.name.endswith(".dcm"):  # DICOM SEG: its frames (UIDs and times differ run by run)
            import pydicom

            mask = pydicom.dcmread(path).pixel_array
        else:
            continue
        mask = np.ascontiguousarray(mask).astype(np.uint8)
        digests[path.name] = hashlib.sha256(repr(mask.shape).encode() + mask.tobytes()).hexdigest()
    return digests


def predicted(tmp: Path) -> dict[str, str]:
    (tmp / "in").mkdir()
    command = [sys.executable, "-m", "tumorseg.inference.predict", *map(str, inputs(tmp / "in")), "--output", str(tmp / "out")]
    done = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return mask_digests(tmp / "out")


def test_masks_are_bit_for_bit_as_pinned(tmp_path):
    assert predicted(tmp_path) == PINNED


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name, digest in predicted(Path(tmp)).items():
            print(f'    "{name}": "{digest}",')
