"""``tumorseg-export``: a self-contained copy of the bundle, for MONAI Label or any bundle user.

The repository keeps one definition of everything shared (network, preprocessing) in
``train.yaml`` and layers ``inference.yaml`` on it. MONAI Label reads a single
``configs/inference.json``, so the export writes that file flattened from the two, with the
top-level ids MONAI Label's ``BundleInferTask`` looks for (``network_def``, ``preprocessing``,
``inferer``, ``postprocessing``, ``device``, ``bundle_root``). Its components are MONAI's, plus
the package's own flip TTA inferer and box fit, which it reaches, like ``train.yaml`` (for MONAI
Label's ``BundleTrainTask``), through the copy of the package under ``scripts/tumorseg`` (MONAI
puts a bundle's root on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

from .bundle import BUNDLE

PACKAGE_DIR = Path(__file__).resolve().parent
# what inference needs from the merged config; training-only ids stay out
INFERENCE_IDS = (
    "image_key", "label_key", "pred_key", "image_size", "channels", "strides", "num_res_units", "dropout",
    "threshold", "min_peak", "min_foreground", "tta", "box_fit", "tta_enabled", "box_fit_enabled", "amp", "device", "network_def", "preprocessing",
    "postprocessing", "infer", "workflow",
    "input_dir", "input_files", "output_dir",
)


def _image_only(transform: dict) -> dict:
    """The image half of a shared image+label transform: MONAI Label's loader reads every key
    of ``LoadImaged`` (ignoring ``allow_missing_keys``), and inference has no label."""
    keys = transform.get("keys")
    if not (isinstance(keys, list) and "@label_key" in keys):
        return transform
    index = keys.index("@image_key")
    out = {k: v[index] if isinstance(v, list) and len(v) == len(keys) and k != "keys" else v for k, v in transform.items()}
    out["keys"] = "@image_key"
    out.pop("allow_missing_keys", None)
    return out


def flattened_inference_config(bundle: Path = BUNDLE, overrides: dict | None = None) -> dict:
    """One inference config from train.yaml + inference.yaml (+ ``overrides``, e.g. the network
    size of the weights), needing nothing but MONAI."""
    from .bundle import inference_parser

    merged = inference_parser(bundle, overrides).get()
    config = {
        "imports": merged["imports"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "checkpoint": "$@ckpt_dir + '/model.pt'",
        "dataset_dir": "$@bundle_root + '/sample'",
        **{k: merged[k] for k in INFERENCE_IDS},
    }
    config["preprocessing"] = [_image_only(t) for t in merged["load_slice"] + merged["slice_preprocessing"]]
    config["network"] = "$@network_def.to(@device)"
    config["inferer"] = "@infer#inferer"
    config["initialize"] = []
    config["run"] = merged["run"]
    config["inference"] = "@run"
    text = json.dumps(config).replace('"$import tumorseg"', '"$import scripts.tumorseg as tumorseg"')
    text = re.sub(r'"_target_": "tumorseg\.', '"_target_": "scripts.tumorseg.', text)
    if re.search(r"(?<!scripts\.)(?<!as )tumorseg\b", text):
        raise RuntimeError("the flattened inference config still refers to the installed tumorseg package")
    return json.loads(text)


def export(
    out: Path, bundle: Path = BUNDLE, checkpoint: Path | None = None, make_zip: bool = False, overrides: dict | None = None
) -> Path:
    """Write ``<out>/<bundle name>/`` (and ``<out>/<bundle name>.zip`` with ``make_zip``)."""
    checkpoint = Path(checkpoint or bundle / "models" / "model.pt")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no model weights to export (train first, or give --checkpoint)")
    target = Path(out) / bundle.name
    if target.exists():
        shutil.rmtree(target)
    (target / "configs").mkdir(parents=True)
    (target / "models").mkdir()
    config = flattened_inference_config(bundle, overrides)
    (target / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("metadata.json", "logging.conf"):
        shutil.copy(bundle / "configs" / name, target / "configs" / name)
    train = (bundle / "configs" / "train.yaml").read_text()
    train = train.replace("$import tumorseg\n", "$import scripts.tumorseg as tumorseg\n")
    train = train.replace("_target_: tumorseg.", "_target_: scripts.tumorseg.").replace("bundle_root: bundles/brain_tumor_mri_seg", "bundle_root: .")
    (target / "configs" / "train.yaml").write_text(train)
    shutil.copy(checkpoint, target / "models" / "model.pt")
    shutil.copytree(bundle / "docs", target / "docs")
    shutil.copy(bundle / "LICENSE", target / "LICENSE")
    scripts = target / "scripts"
    scripts.mkdir()
    (scripts / "__init__.py").write_text("")
    shutil.copytree(PACKAGE_DIR, scripts / "tumorseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if make_zip:
        with zipfile.ZipFile(target.with_suffix(".zip"), "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(target.rglob("*")):
                zf.write(path, path.relative_to(target.parent))
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tumorseg-export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("output", type=Path, help="folder to write <bundle name>/ into (e.g. monailabel_app/model)")
    p.add_argument("--bundle", type=Path, default=BUNDLE)
    p.add_argument("--checkpoint", type=Path, help="weights (default: <bundle>/models/model.pt)")
    p.add_argument("--zip", action="store_true", help="also write <bundle name>.zip")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override written into inference.json, e.g. --set image_size=128 (JSON values)")
    args = p.parse_args(argv)
    from .bundle import parse_overrides

    overrides = parse_overrides(args.set)
    try:
        target = export(args.output, args.bundle, args.checkpoint, args.zip, overrides)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
