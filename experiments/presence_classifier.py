"""Fit the learned presence decision (``tumorseg.postprocessing.presence.PresenceClassifier``) for one set of
weights, choose its threshold, and measure it against the peak gate. One MLflow run
(``presence_classifier_<name>``), nested under the training run of the weights.

    python -m experiments.presence_classifier --dataset_dir runs/kaggle-real --checkpoint <model.pt> \\
        --output <models/presence.json> [--name NAME] [--specificity 0.9]

``--dataset_dir``: the output of ``python -m data_tools.healthy`` with ``--real`` and
``--other-tumours``. The regression is fitted on its ``training`` list (Kaggle tumour slices and
every negative, the real healthy training part among them: what the network was trained on);
the threshold is the lowest whose specificity on ``healthy_select`` (real healthy slices nobody
trained on) reaches ``--specificity``, kept only while ``validation`` sensitivity stays at or above
``--min_sensitivity``; ``healthy_real`` and ``other_tumours`` are reported, never used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"


def features_of(predictor, items: list[dict], limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows and slice labels (1 tumour) of datalist items, through ``predictor``'s network."""
    from tumorseg.io.reading import read_slice
    from tumorseg.postprocessing.presence import presence_features

    items = items[:limit] if limit else items
    rows, labels = [], []
    for k, item in enumerate(items):
        image = read_slice(Path(item["image"]))
        (prob,) = predictor.probability_maps([image])
        rows.append(presence_features(prob))
        labels.append(int(item["tumour"]) if "label" not in item else int((read_slice(Path(item["label"])) > 0).any()))
        print(f"\r{k + 1}/{len(items)} slices", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.array(rows), np.array(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=BUNDLE / "models" / "model.pt")
    ap.add_argument("--output", type=Path, required=True, help="where the classifier's JSON goes (e.g. <ckpt_dir>/presence.json)")
    ap.add_argument("--name", default="shipped")
    ap.add_argument("--specificity", type=float, default=0.9, help="target specificity on healthy_select")
    ap.add_argument("--min_sensitivity", type=float, default=0.98, help="lowest validation sensitivity allowed")
    ap.add_argument("--train_stride", type=int, default=1, help="fit on every Nth training slice (a quicker fit)")
    ap.add_argument("--tracking_dir", type=Path, default=REPO / "mlflow")
    ap.add_argument("--experiment", default="brain_tumor_mri_seg")
    args = ap.parse_args()

    from monai.data import load_decathlon_datalist

    from tumorseg.inference.predictor import Predictor
    from tumorseg.postprocessing.presence import FEATURES, PresenceClassifier

    start = time.time()
    predictor = Predictor.from_bundle(BUNDLE, args.checkpoint, {"runtime": "torch"}, tta=True)
    datalist = str(args.dataset_dir / "datalist.json")
    lists = {
        key: load_decathlon_datalist(datalist, data_list_key=key, base_dir=str(args.dataset_dir))
        for key in ("training", "validation", "healthy_select", "healthy_real", "other_tumours")
    }
    unique = {item["image"]: item for item in lists["training"]}  # real negatives are listed several times
    train = list(unique.values())[:: args.train_stride]
    x_train, y_train = features_of(predictor, train)
    classifier = PresenceClassifier.fit(
        x_train, y_train, note=f"fitted on {len(y_train)} training slices of {args.checkpoint.name}"
    )
    figures = {}
    probs = {}
    for key in ("validation", "healthy_select", "healthy_real", "other_tumours"):
        x, y = features_of(predictor, lists[key])
        probs[key] = (classifier.probability(x), x[:, FEATURES.index("peak")], y)

    def spec(t):  # specificity on the selection split
        return float(np.mean(probs["healthy_select"][0] < t))

    def sens(t):  # sensitivity on valid
        return float(np.mean(probs["validation"][0] >= t))

    candidates = [round(float(t), 2) for t in np.linspace(0.02, 0.98, 49)]
    allowed = [t for t in candidates if sens(t) >= args.min_sensitivity] or candidates[:1]
    reaching = [t for t in allowed if spec(t) >= args.specificity]
    chosen = reaching[0] if reaching else allowed[-1]  # the lowest reaching the target, else the most specific allowed
    classifier.threshold = chosen
    table = [
        "| decision | valid sensitivity | select specificity | held-out specificity | other-collection sensitivity |",
        "|---|---|---|---|---|",
    ]
    for label, score, cut in [("classifier", 0, chosen)] + [(f"peak >= {t}", 1, t) for t in (0.5, 0.8, 0.9, 0.98)]:
        row = {}
        for key, (p, peak, _) in probs.items():
            s = p if score == 0 else peak
            row[key] = float(np.mean(s >= cut)) if key in ("validation", "other_tumours") else float(np.mean(s < cut))
        figures[label] = row
        table.append(
            f"| {label if score else f'classifier >= {cut}'} | {row['validation']:.3f} | {row['healthy_select']:.3f} | "
            f"{row['healthy_real']:.3f} | {row['other_tumours']:.3f} |"
        )
    text = (
        f"Presence decision of {args.checkpoint} (TTA): {len(lists['validation'])} valid tumour slices, "
        f"{len(lists['healthy_select'])} selection and {len(lists['healthy_real'])} held-out real healthy slices, "
        f"{len(lists['other_tumours'])} other-collection tumour slices\n\n" + "\n".join(table) + "\n"
    )
    print(text)
    classifier.save(args.output)
    print(f"wrote {args.output} (threshold {chosen})")

    from mlflow.entities import Metric, Param

    from experiments.components import run_of_weights

    client, run = run_of_weights(
        args.tracking_dir, args.experiment, args.checkpoint, "presence", f"presence_classifier_{args.name}"
    )
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{key}.{label.replace(' >= ', '_').replace('.', '_')}", value, now, 0)
        for label, row in figures.items()
        for key, value in row.items()
    ]
    params = {
        "checkpoint": str(args.checkpoint),
        "threshold": chosen,
        "train_slices": len(y_train),
        "seconds": round(time.time() - start),
    }
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, text, "presence_classifier.md")
    client.log_text(run.info.run_id, json.dumps(figures, indent=1), "presence_classifier.json")
    client.log_artifact(run.info.run_id, str(args.output))
    client.set_terminated(run.info.run_id)
    print(f"MLflow run presence_classifier_{args.name}: {run.info.run_id}")


if __name__ == "__main__":
    main()
