"""Cut the small attributed sample that lives in the repo (data/brain-tumor-coco-sample).

Deterministic: every k-th image (by file name) of each source split, plus the dataset's two
edge cases (an image without annotation, an image with a tiny second box). The Kaggle test
split is held out, so the sample's ``test/`` is drawn from ``valid`` images that are not in the
sample's ``valid/``. Each split keeps the COCO json's info, licenses and categories.

    python -m data_tools.make_sample ../shared/data/brain-tumor-coco data/brain-tumor-coco-sample
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

EDGE_CASES = (
    "2369_jpg.rf.8b8afa9d79c61fa42ca128c940b9cbc0.jpg",  # no annotation
    "176_jpg.rf.23ef40c30986ba54b865d55a934bfa72.jpg",  # second, 2.5x7.5 px box
)
# sample split -> (source split, how many, offset among every-k-th picks)
LAYOUT = {"train": ("train", 24, 0), "valid": ("valid", 8, 0), "test": ("valid", 8, 1)}

NOTICE = """Sample of the Kaggle dataset "Brain Tumor Image DataSet: Semantic Segmentation"
(published by pkdarabi; exported from roboflow.com on 2023-08-19), licensed CC BY 4.0:
https://creativecommons.org/licenses/by/4.0/
Source: https://www.kaggle.com/datasets/pkdarabi/brain-tumor-image-dataset-semantic-segmentation
Changes: a subset of {n} images was selected (data_tools/make_sample.py); images and their
annotations are unmodified. The Kaggle test split is held out, so test/ here holds images from
the Kaggle valid split that are not in valid/.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    total = 0
    for split, (src, n, offset) in LAYOUT.items():
        coco = json.loads((args.source / src / "_annotations.coco.json").read_text())
        names = sorted(im["file_name"] for im in coco["images"])
        chosen = [c for c in EDGE_CASES if c in names] if split == "train" else []
        step = len(names) // (2 * n)
        chosen += [nm for nm in names[offset * step :: 2 * step] if nm not in chosen][: n - len(chosen)]
        images = [im for im in coco["images"] if im["file_name"] in chosen]
        ids = {im["id"] for im in images}
        out = dict(coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        (args.dest / split).mkdir(parents=True, exist_ok=True)
        (args.dest / split / "_annotations.coco.json").write_text(json.dumps(out, indent=1) + "\n")
        for im in images:
            shutil.copyfile(args.source / src / im["file_name"], args.dest / split / im["file_name"])
        total += len(images)
    (args.dest / "LICENSE.txt").write_text(NOTICE.format(n=total))
    print(f"wrote {total} images to {args.dest}")


if __name__ == "__main__":
    main()
