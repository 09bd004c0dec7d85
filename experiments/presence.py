"""Presence check of one set of weights: tumour found where there is one, nothing where there is
none. One MLflow run (``presence_<name>``), nested under the training run of the weights.

    python -m experiments.presence --dataset_dir runs/kaggle-negatives [--checkpoint <model.pt>] \
        [--tracking_dir mlflow] [--name shipped] [--output table.md]

``--dataset_dir`` is the output of ``python -m data_tools.healthy`` (its ``validation`` list:
Kaggle ``valid``, all tumour slices; ``healthy``: held-out healthy slices). Measured, through
``tumorseg.inference.predictor.Predictor`` at the inference defaults (flip TTA, box fit), for every
presence threshold ``min_peak`` in ``MIN_PEAKS`` and 3D rule ``min_run`` in ``MIN_RUNS``:

- on ``valid``: per-image tumour Dice at each slice's own size, and slice-level sensitivity (the
  share of tumour slices with any prediction);
- on the held-out healthy slices: specificity (the share with no prediction);
- on healthy volumes (``healthy_volumes``: nilearn's MNI152 template at 1 and 2 mm, stored in
  other axis orders and as a DICOM series, and nibabel's real test volumes that no training
  slice came from): the false-positive volume in cm³, read through ``tumorseg-predict``'s path
  (canonical orientation, foreground skip).

The network runs once per slice at the lowest ``min_peak`` (the box fit cuts its boxes at fixed
levels, so its box does not depend on ``min_peak``); a higher ``min_peak`` only clears slices
whose peak probability is below it, and ``min_run`` only clears tumours spanning fewer
slices (``tumorseg.postprocessing.volume.drop_short_tumours``), so every setting is read from the same pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
MIN_PEAKS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
MIN_RUNS = (1, 2, 3)


def healthy_volumes(tmp: Path) -> dict[str, Path]:
    """Name -> path of each healthy volume, NIfTI files or DICOM series folders written to ``tmp``."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    from data_tools.healthy import HELDOUT, canonical_volume  # noqa: F401  (HELDOUT: the volumes kept aside)
    from data_tools.nifti_to_dicom import write_series

    out = {}
    for res in (1, 2):
        t = load_mni152_template(resolution=res)
        out[f"mni152_{res}mm"] = tmp / f"mni152_{res}mm.nii.gz"
        nib.save(t, out[f"mni152_{res}mm"])
        permuted = t.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))  # sagittal-first, flipped
        out[f"mni152_{res}mm_sagittal_first"] = tmp / f"mni152_{res}mm_sagittal_first.nii.gz"
        nib.save(permuted, out[f"mni152_{res}mm_sagittal_first"])
    t = load_mni152_template(resolution=2)
    write_series(np.asarray(t.dataobj, dtype=np.float32), t.affine, tmp / "mni152_2mm_dicom")
    out["mni152_2mm_dicom"] = tmp / "mni152_2mm_dicom"
    for name, locate in HELDOUT.items():
        img = nib.load(locate())
        data = np.asarray(img.dataobj, dtype=np.float32)
        path = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data[..., 0] if data.ndim > 3 else data, img.affine), path)  # a 4D series: its first volume
        out[name] = path
    return out


def slice_records(predictor, items: list[dict], quarter_turns: int = 0) -> list[dict]:
    """Per slice: peak probability, and the Dice of its mask against its label; with
    ``quarter_turns``, of the slice and its label turned that many times by 90 degrees."""
    from tumorseg.io.reading import read_slice

    rows = []
    for item in items:
        image = np.ascontiguousarray(np.rot90(read_slice(Path(item["image"])), quarter_turns))
        mask, peaks = predictor.predict_volume(image)
        row = {"image": item["image"], "peak": peaks[0], "found": bool(mask.any())}
        if "label" in item:
            label = np.rot90(read_slice(Path(item["label"])) > 0, quarter_turns)
            inter, total = float((mask & label).sum()), float(mask.sum() + label.sum())
            row.update(tumour=bool(label.any()), dice_if_kept=1.0 if total == 0 else 2 * inter / total)
            row["dice_if_cleared"] = 1.0 if not label.any() else 0.0
        else:  # a slice label only (data_tools.healthy's real lists): presence, no Dice
            row["tumour"] = bool(item["tumour"])
        rows.append(row)
        print(f"\r{len(rows)}/{len(items)} slices", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def volume_records(predictor, volumes: dict[str, Path]) -> dict[str, dict]:
    """Per volume: the canonical mask at the lowest ``min_peak``, each axial slice's peak, the voxel volume in mm³."""
    from tumorseg.io.reading import read_case

    out = {}
    for name, path in volumes.items():
        case = read_case(path)
        stored = case.image[0].numpy()
        view = case.canonical()[0].numpy()
        mask, peaks = predictor.predict_volume(view, axis=-1, reference=(float(stored.min()), float(stored.max())))
        out[name] = {"mask": mask, "peaks": list(peaks), "voxel_mm3": float(np.prod(case.spacing))}
        print(f"{name}: {mask.sum() * out[name]['voxel_mm3'] / 1000:.2f} cm³ at the lowest min_peak", file=sys.stderr)
    return out


REAL_LISTS = {  # data_tools.healthy --real/--other-tumours: list -> the figure it gives
    "healthy_select": "select_specificity",
    "healthy_real": "real_specificity",
    "other_tumours": "other_sensitivity",
}


def table(slices_valid, slices_healthy, volumes, real: dict | None = None) -> list[dict]:
    """One row per (min_peak, min_run); ``real``: records of the REAL_LISTS present."""
    from tumorseg.postprocessing.volume import drop_short_tumours

    rows = []
    for min_peak in MIN_PEAKS:
        kept = [r["found"] and r["peak"] >= min_peak for r in slices_valid]
        dice = np.mean([r["dice_if_kept"] if k else r["dice_if_cleared"] for r, k in zip(slices_valid, kept)])
        sensitivity = np.mean([k for r, k in zip(slices_valid, kept) if r["tumour"]])
        specificity = np.mean([not (r["found"] and r["peak"] >= min_peak) for r in slices_healthy])
        extra = {}
        for key, records in (real or {}).items():
            found = [r["found"] and r["peak"] >= min_peak for r in records]
            extra[REAL_LISTS[key]] = float(np.mean(found) if key == "other_tumours" else 1 - np.mean(found))
        for min_run in MIN_RUNS:
            row = {
                "min_peak": min_peak,
                "min_run": min_run,
                "valid_dice": float(dice),
                "valid_sensitivity": float(sensitivity),
                "healthy_specificity": float(specificity),
                **extra,
            }
            for name, v in volumes.items():
                kept = v["mask"] & (np.array(v["peaks"]) >= min_peak)  # slices below min_peak cleared
                kept = drop_short_tumours(kept, min_run)
                row[f"fp_cm3.{name}"] = float(kept.sum() * v["voxel_mm3"] / 1000)
            row["fp_cm3_max"] = max(row[k] for k in row if k.startswith("fp_cm3."))
            rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    header = list(rows[0])
    short = [h.replace("fp_cm3.", "") for h in header]
    lines = [title, "", "| " + " | ".join(short) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True, help="output of python -m data_tools.healthy")
    ap.add_argument("--checkpoint", type=Path, default=BUNDLE / "models" / "model.pt")
    ap.add_argument("--name", default="shipped", help="run name suffix (presence_<name>)")
    ap.add_argument("--tracking_dir", type=Path, default=REPO / "mlflow")
    ap.add_argument("--experiment", default="brain_tumor_mri_seg")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a bundle setting, e.g. image_size=224")
    ap.add_argument("--limit", type=int, default=0, help="only the first N slices of each list (a quick look)")
    ap.add_argument("--output", type=Path, help="also write the table to this Markdown file (and its rows beside, .json)")
    args = ap.parse_args()

    from monai.data import load_decathlon_datalist

    from tumorseg.inference.predictor import Predictor

    start = time.time()
    settings = dict(s.split("=", 1) for s in args.set)
    defaults = Predictor.from_bundle(BUNDLE, args.checkpoint, settings)  # the shipped settings: which row is the default
    default = {"min_peak": defaults.gate.min_peak, "min_run": defaults.min_run}
    predictor = Predictor.from_bundle(BUNDLE, args.checkpoint, {**settings, "min_peak": min(MIN_PEAKS), "min_run": 1})
    datalist = str(args.dataset_dir / "datalist.json")
    keys = ("validation", "healthy") + tuple(k for k in REAL_LISTS if k in json.loads(Path(datalist).read_text()))
    lists = {key: load_decathlon_datalist(datalist, data_list_key=key, base_dir=str(args.dataset_dir)) for key in keys}
    if args.limit:
        lists = {k: v[: args.limit] for k, v in lists.items()}
    valid = slice_records(predictor, lists["validation"])
    healthy = slice_records(predictor, lists["healthy"])
    with tempfile.TemporaryDirectory() as tmp:
        volumes = volume_records(predictor, healthy_volumes(Path(tmp)))
    real = {key: slice_records(predictor, lists[key]) for key in REAL_LISTS if key in lists}
    rows = table(valid, healthy, volumes, real)
    weights = args.checkpoint.resolve()
    shown = weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights
    text = markdown(
        rows,
        f"Presence on `valid` ({len(valid)} tumour slices), {len(healthy)} held-out healthy slices and "
        f"{len(volumes)} healthy volumes; weights {shown} (TTA and box fit on)",
    )
    print(text)
    chosen = next(r for r in rows if r["min_peak"] == default["min_peak"] and r["min_run"] == default["min_run"])
    print("default setting: " + ", ".join(f"{k} {v:.4g}" for k, v in chosen.items()))
    if args.output:
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"default": chosen, "rows": rows}, indent=1) + "\n")

    from mlflow.entities import Metric, Param

    from experiments.components import run_of_weights

    client, run = run_of_weights(args.tracking_dir, args.experiment, args.checkpoint, "presence", f"presence_{args.name}")
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{k}.min_peak_{r['min_peak']}.min_run_{r['min_run']}".replace("0.", "0_"), float(v), now, 0)
        for r in rows
        for k, v in r.items()
        if k not in ("min_peak", "min_run")
    ]
    params = {
        "checkpoint": str(args.checkpoint),
        "valid_slices": len(valid),
        "healthy_slices": len(healthy),
        **{f"{key}_slices": len(records) for key, records in real.items()},
        "healthy_volumes": ",".join(volumes),
        "min_peaks": str(MIN_PEAKS),
        "min_runs": str(MIN_RUNS),
        "seconds": round(time.time() - start),
    }
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, text, "presence.md")
    peaks = {name: v["peaks"] for name, v in volumes.items()}
    client.log_text(run.info.run_id, json.dumps({"rows": rows, "volume_peaks": peaks}, indent=1), "presence.json")
    client.set_terminated(run.info.run_id)
    print(f"MLflow run presence_{args.name}: {run.info.run_id}")


if __name__ == "__main__":
    main()
