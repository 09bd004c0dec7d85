"""MONAI Label app that serves every exported bundle under ``model/`` (see README, "MONAI Label").

    make monailabel-app            # exports bundles/brain_tumor_mri_seg into model/
    TUMORSEG_CORS_ORIGINS=http://127.0.0.1:8000 .venv-monailabel/bin/monailabel start_server \
        --app monailabel_app --studies STUDIES --host 127.0.0.1 --port 8000 --conf models brain_tumor_mri_seg

The export is a copy of the bundle: its configs name their components ``tumorseg.*``, the package
installed into MONAI Label's environment from its wheel (``make monailabel-venv``), and each
workflow is layered on ``configs/common.yaml``, the bundle's shared definitions, which this app reads first.

Per bundle: an infer task, a train task (the bundle's training recipe, ``training``, on the
labels saved in the datastore) and, for the first bundle, MC-dropout epistemic scoring; strategies
``random``, ``first`` and ``epistemic``. Training writes into ``models/monailabel/`` of the export
(``model.pt``, ``refiner.pt``, ``stages/``, ``eval/``, ``train_stats.json``), never over the shipped
``models/model.pt``; /infer serves the trained weights once they exist (MONAI Label's model
versioning: the last existing file of the task's path list).

On a PACS (``--studies http://host:port/dicom-web``, see README "MONAI Label on the PACS"): the
datastore is MONAI Label's DICOMweb datastore (:class:`SeriesDatastore`), listing the server's MR
series (QIDO-RS), each downloaded (WADO-RS) as its folder of DICOM files when first asked for.
/infer predicts such a series (or any NIfTI volume, or a PNG/JPG slice of a local datastore) as
``tumorseg-predict`` does: read by tumorseg's own reader, axial slices of the canonical
orientation through the bundle's ``predictor``, the mask back in the series' geometry, a NIfTI
(a slice's: a PNG). A final label saved through
PUT /datastore/label is stored on the server as a DICOM SEG (STOW-RS, checked by QIDO-RS), and
/train trains on the axial slices of the labelled series that hold tumour (16-bit PNG image,
0/1 PNG label, written under ``models/monailabel/slices/``). Login: MONAI Label's
MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD, else TUMORSEG_DICOMWEB_USER/_PASSWORD, else netrc; series
searched with MONAI_LABEL_DICOMWEB_SEARCH_FILTER, ``{"Modality": "MR"}`` unless set otherwise. A
server that is unreachable or refuses the login stops the app at start with one ``error:`` line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastapi import HTTPException
from monai.transforms import SqueezeDimd
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring
from monailabel.tasks.train.bundle import BundleTrainTask

from tumorseg.io.files import file_digest

logger = logging.getLogger(__name__)

TRAINED = Path("models") / "monailabel"  # in the bundle: what training from MONAI Label writes
STATS = "train_stats.json"


def _bundle_infer_task_class():
    # monailabel.transform.post imports torchvision.utils at import time, for a debug transform
    # only; no torchvision works beside the CPU torch, so a stub stands in for that one import.
    stubs = {}
    if "torchvision" not in sys.modules:
        package, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        utils.make_grid = utils.save_image = None
        package.utils = utils
        stubs = {"torchvision": package, "torchvision.utils": utils}
        sys.modules.update(stubs)
    try:
        from monailabel.tasks.infer.bundle import BundleInferTask
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return BundleInferTask


BundleInferTask = _bundle_infer_task_class()


def config_files(config) -> list[str]:
    """A workflow's config files in their layering order (``tumorseg.bundle.WORKFLOWS``, the one
    definition of the layers: ``inference.yaml`` on ``common.yaml`` ...), from ``config``'s folder."""
    from tumorseg.bundle import WORKFLOWS

    config = Path(config)
    layers = min((w for w in WORKFLOWS.values() if w[-1] == config.name), key=len, default=(config.name,))
    return [str(config.parent / name) for name in layers]


def layered_config(path, config):
    """MONAI Label's ``ConfigParser`` of one bundle config, layered on the bundle's
    ``configs/common.yaml`` (as ``--config_file "['common.yaml', ...]"`` does on the command line)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(config))
    parser.config.update({"bundle_root": path})
    return parser


# ---- volumes: a DICOM series folder (the PACS datastore's images) or a NIfTI file -------------
VOLUME_SUFFIXES = (".nii", ".nii.gz")


def is_volume(path) -> bool:
    """A DICOM series folder or a NIfTI volume: predicted as ``tumorseg-predict`` predicts it."""
    path = Path(str(path))
    return path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES)


def read_label(case, path):
    """A label volume (NIfTI) of ``case``, as an (x, y, z) bool array in the case's voxel order;
    refused (``InputError``) unless it has the case's shape and affine: a label of another
    series, or resampled."""
    import nibabel as nib
    import numpy as np

    from tumorseg.io.reading import InputError

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise InputError(f"{Path(path).name}: unreadable label ({e.__class__.__name__}: {e})") from None
    shape = tuple(case.image.shape[1:])
    while data.ndim > len(shape) and data.shape[-1] == 1:
        data = data[..., 0]
    if data.shape != shape or not np.allclose(img.affine, np.asarray(case.image.affine), atol=1e-3):
        raise InputError(
            f"a label of shape {data.shape} is not in the geometry of the series ({shape}, affine"
            f" {np.round(np.asarray(case.image.affine), 3).tolist()}): give the mask /infer returned, edited"
        )
    return data > 0


def seg_mask(seg, case):
    """The (x, y, z) mask that the DICOM SEG ``seg`` (a pydicom dataset) holds for the series
    ``case``: each frame put on the slice at its ImagePositionPatient. Raises ``InputError``."""
    import numpy as np

    from tumorseg.io.reading import InputError

    shape = tuple(case.image.shape[1:])
    if (int(seg.Columns), int(seg.Rows)) != shape[:2]:
        raise InputError(f"DICOM SEG frames of {seg.Columns}x{seg.Rows} pixels on a series of {shape[0]}x{shape[1]}")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in case.datasets])
    spacing = min(float(v) for v in case.datasets[0].PixelSpacing)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    mask = np.zeros(shape, dtype=bool)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        where = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        distance = np.linalg.norm(positions - where, axis=1)
        k = int(np.argmin(distance))
        if distance[k] > 0.5 * spacing:
            raise InputError(f"a DICOM SEG frame at {where.tolist()} lies on no slice of the series")
        mask[:, :, k] |= frame.T > 0
    return mask


def volume_slices(image, label, folder: Path) -> list[dict]:
    """The training items of a labelled volume: each axial slice of its canonical orientation (the
    slices the predictor sees) whose label holds tumour, written into ``folder`` as a 16-bit PNG
    (the slice scaled to 0..65535: the bundle's ScaleIntensity takes each slice to [0, 1] anyway)
    and a 0/1 PNG label, as the bundle's ``load_slice`` reads them."""
    import io

    import numpy as np
    import torch
    from monai.data import MetaTensor
    from PIL import Image

    from tumorseg.io.reading import Case, read_case
    from tumorseg.io.writing import png_bytes

    case = read_case(Path(image))
    mask = read_label(case, label)
    view = case.canonical()[0].numpy()
    labelled = Case(case.path, case.kind, MetaTensor(torch.as_tensor(mask.astype(np.uint8))[None], affine=case.image.affine))
    mask_view = labelled.canonical()[0].numpy() > 0
    if view.ndim == 2:
        view, mask_view = view[..., None], mask_view[..., None]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    items = []
    for k in range(view.shape[-1]):
        if not mask_view[..., k].any():
            continue
        s = view[..., k].astype(np.float64)
        lo, hi = float(s.min()), float(s.max())
        scaled = np.round((s - lo) / (hi - lo) * 65535) if hi > lo else np.zeros_like(s)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(scaled.T).astype(np.uint16)).save(buf, format="PNG")
        (folder / f"slice{k:04d}.png").write_bytes(buf.getvalue())
        (folder / f"slice{k:04d}_label.png").write_bytes(png_bytes(mask_view[..., k]))
        items.append({"image": str(folder / f"slice{k:04d}.png"), "label": str(folder / f"slice{k:04d}_label.png")})
    logger.info(f"{image}: {len(items)} of {view.shape[-1]} axial slices with tumour, as training slices in {folder}")
    return items


# ---- the PACS: MONAI Label's DICOMweb datastore, a series kept as its folder of DICOM files ----
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
TIMEOUT_ENV = "TUMORSEG_DICOMWEB_TIMEOUT"  # seconds to connect and between bytes (tumorseg.inference.dicomweb's)


class PacsError(HTTPException):
    """A request to the DICOMweb server that failed: one line naming the server and the problem,
    MONAI Label's answer (HTTP 502, or 4xx for the client's mistake), without a traceback."""

    def __init__(self, line: str, status: int = 502):
        super().__init__(status_code=status, detail=line)

    def __str__(self) -> str:
        return self.detail


def pacs_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else 30.0
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise PacsError(f"{TIMEOUT_ENV}={raw!r}: not a positive number of seconds", 400)
    return value


@contextmanager
def reported(root: str, doing: str):
    """What requests (or a server's odd answer) raises while ``doing``, as a :class:`PacsError` line."""
    import requests

    try:
        yield
    except PacsError:
        raise
    except requests.exceptions.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status in (401, 403):
            problem = (
                f"authentication refused (HTTP {status}); check MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD"
                " (or TUMORSEG_DICOMWEB_USER/_PASSWORD, or the netrc entry)"
            )
        elif status == 404:
            problem = f"not found (HTTP 404) while {doing}: is this the server's DICOMweb root?"
        else:
            problem = f"the server answered HTTP {status} while {doing}"
        raise PacsError(f"{root}: {problem}") from None
    except requests.exceptions.Timeout:
        raise PacsError(f"{root}: no answer within {pacs_timeout():g} s while {doing} (a slow server? {TIMEOUT_ENV})") from None
    except requests.exceptions.RequestException as e:
        if "timed out" in str(e):
            raise PacsError(
                f"{root}: no answer within {pacs_timeout():g} s while {doing} (a slow server? {TIMEOUT_ENV})"
            ) from None
        reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
        raise PacsError(f"{root}: server unreachable ({reason[1] if reason else e.__class__.__name__}) while {doing}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise PacsError(f"{root}: an answer of the server not understood while {doing} ({e.__class__.__name__}: {e})") from None


def pacs_client(root: str):
    """MONAI Label's DICOMweb client for ``root``: HTTP basic login of MONAI Label's settings, else
    of TUMORSEG_DICOMWEB_USER/_PASSWORD, else requests' netrc; each request tried once (a failure
    is told at once), with a timeout (TUMORSEG_DICOMWEB_TIMEOUT, 30 s)."""
    from urllib.parse import urlsplit

    import requests

    parts = urlsplit(root)
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        raise PacsError(
            f"{parts.scheme}://{host}{parts.path}: credentials in the URL are refused;"
            " set MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD",
            400,
        )
    timeout = pacs_timeout()

    class TimeoutAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            kwargs["timeout"] = kwargs.get("timeout") or timeout
            return super().send(request, **kwargs)

    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, TimeoutAdapter())
    user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    if not (user and password):
        user, password = os.environ.get("TUMORSEG_DICOMWEB_USER"), os.environ.get("TUMORSEG_DICOMWEB_PASSWORD")
    if user and password:
        session.auth = (user, password)
    client = DICOMwebClientX(
        url=root,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    client.set_http_retry_params(retry=False)
    return client


class SeriesDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with each series kept as its folder of DICOM files (MONAI
    Label 0.8.5 without its NIfTI conversion registers neither images nor labels, and its DICOM SEG
    writer needs dcmqi): a series is downloaded (WADO-RS) into the cache when first asked for and
    registered there as the folder; a final label (a NIfTI in the series' geometry, what /infer
    returns) is stored on the server as a DICOM SEG by MONAI Label's own pydicom-seg writer and
    STOW-RS, checked by QIDO-RS, and kept in the cache; SEGs found on the server (labels made
    elsewhere) are read back into the series' geometry for training. Every failure of the server
    is one line (:class:`PacsError`)."""

    def __init__(self, client, search_filter, cache_path=None):
        super().__init__(client, search_filter, cache_path, fetch_by_frame=False, convert_to_nifti=False)
        self._root = client.base_url
        self._series_lock = threading.Lock()

    def _uid(self, uid: str) -> str:
        if not isinstance(uid, str) or not UID.fullmatch(uid):
            raise PacsError(f"{uid!r}: not a DICOM UID (a SeriesInstanceUID of {self._root})", 404)
        return uid

    def _register_image(self, image_id: str, info: dict) -> None:
        self._init_from_datastore_file()
        if image_id in self._datastore.objects:
            return
        from filelock import FileLock

        with FileLock(self._lock_file):
            info = {**info, "ts": int(time.time()), "name": image_id}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=""))
            self._update_datastore_file(lock=False)

    def _download(self, study: str, series: str, folder: Path, doing: str) -> None:
        """The instances of a series into ``folder`` (complete or not at all)."""
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            with reported(self._root, doing):
                instances = self._client.retrieve_series(study, series)
            if not instances:
                raise PacsError(f"{self._root}: the server sent no instances of series {series}")
            for ds in instances:
                ds.save_as(str(partial / f"{ds.SOPInstanceUID}.dcm"))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _series(self, uid: str) -> dict:
        """QIDO-RS attributes of a series of the server (StudyInstanceUID, Modality...)."""
        from pydicom.dataset import Dataset

        with reported(self._root, f"searching series {uid} (QIDO-RS)"):
            found = [Dataset.from_json(d) for d in self._client.search_for_series(search_filters={"SeriesInstanceUID": uid})]
        found = [d for d in found if str(d.get("SeriesInstanceUID", "")) == uid]
        if not found:
            raise PacsError(f"{self._root}: no series {uid} on the server (QIDO-RS found none)", 404)
        fields = ["StudyInstanceUID", "Modality", "PatientID", "StudyDate", "SeriesDescription"]
        return {"SeriesInstanceUID": uid, **{f: str(found[0].get(f, "") or "") for f in fields}}

    def list_images(self):
        with reported(self._root, "listing the series (QIDO-RS)"):
            return super().list_images()

    def get_labeled_images(self, label_tag=None, labels=None):
        with reported(self._root, "listing the DICOM SEGs (QIDO-RS)"):  # once per series with several SEGs
            return list(dict.fromkeys(super().get_labeled_images(label_tag, labels)))

    def get_image_uri(self, image_id: str) -> str:
        """The series' folder of DICOM files in the cache (downloaded first if need be)."""
        image_id = self._uid(image_id)
        folder = Path(self._datastore.image_path()) / image_id
        with self._series_lock:
            if not folder.is_dir() or not any(folder.iterdir()):
                info = self._series(image_id)
                self._download(info["StudyInstanceUID"], image_id, folder, f"downloading series {image_id} (WADO-RS)")
                self._register_image(image_id, info)
            elif image_id not in self._datastore.objects:
                self._register_image(image_id, {"SeriesInstanceUID": image_id})
        return str(folder.resolve())

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label of the cache; with ``image_id`` (MONAI Label's training datalist: ``label_id`` a
        SEG series on the server that references ``image_id``), that SEG read back into the
        series' geometry unless the cache has the image's final label already."""
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        local = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if local and os.path.exists(local):
            return local
        import pydicom

        from tumorseg.io.reading import InputError, read_case
        from tumorseg.io.writing import mask_bytes

        folder = self.get_image_uri(image_id)
        info = self._series(label_id)
        with tempfile.TemporaryDirectory() as tmp:
            self._download(info["StudyInstanceUID"], label_id, Path(tmp) / "seg", f"downloading DICOM SEG {label_id} (WADO-RS)")
            try:
                case = read_case(Path(folder))
                mask = seg_mask(pydicom.dcmread(next((Path(tmp) / "seg").iterdir())), case)
            except (InputError, AttributeError, ValueError) as e:
                logger.warning(f"{self._root}: DICOM SEG {label_id} of series {image_id} left out: {e}")
                return ""
            path = Path(tmp) / "label.nii.gz"
            path.write_bytes(mask_bytes(case, mask))
            LocalDatastore.save_label(self, image_id, str(path), label_tag, {"SeriesInstanceUID": label_id, "Modality": "SEG"})
        return LocalDatastore.get_label_uri(self, image_id, label_tag)

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        """A label of a series: a final one is stored on the server first (a DICOM SEG in the
        series' study, by STOW-RS, checked by QIDO-RS), then kept in the cache; any other tag
        only in the cache. A label not in the series' geometry, or empty (a DICOM SEG holds at
        least one segment), is refused in one line."""
        from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
        from monailabel.datastore.utils.dicom import dicom_web_upload_dcm

        from tumorseg.io.reading import InputError, read_case

        folder = self.get_image_uri(image_id)
        converted = ""
        if "".join(Path(label_filename).suffixes) == ".bin":  # OHIF's raw labels
            converted = label_filename = binary_to_image(folder, label_filename)
        try:
            if label_tag == DefaultLabelTag.FINAL:
                try:
                    mask = read_label(read_case(Path(folder)), label_filename)
                except InputError as e:
                    raise PacsError(f"series {image_id}: {e}; not stored", 422) from None
                if not mask.any():
                    raise PacsError(
                        f"series {image_id}: an empty label (no tumour): a DICOM SEG needs a segment; not stored", 422
                    )
                described = (label_info or {}).get("label_info") or [{"name": "tumour", "description": "brain tumour"}]
                seg = nifti_to_dicom_seg(folder, label_filename, described, use_itk=False)
                try:
                    with reported(self._root, f"storing the DICOM SEG of series {image_id} (STOW-RS)"):
                        seg_series = dicom_web_upload_dcm(seg, self._client)
                finally:
                    os.unlink(seg)
                if not seg_series:
                    raise PacsError(
                        f"{self._root}: the server did not confirm storing the DICOM SEG of series {image_id} (STOW-RS)"
                    )
                stored = self._series(seg_series)  # QIDO-RS: the server holds it
                image = self._series(image_id)
                if stored["Modality"] != "SEG" or stored["StudyInstanceUID"] != image["StudyInstanceUID"]:
                    raise PacsError(
                        f"{self._root}: series {seg_series} stored, but not as a DICOM SEG of study {image['StudyInstanceUID']}"
                    )
                label_info = {**(label_info or {}), "SeriesInstanceUID": seg_series, "Modality": "SEG"}
                label_info.update({k: image[k] for k in ("PatientID", "StudyInstanceUID")})
                DICOMWebDatastore.get_labeled_images.cache_clear()  # the next listing sees the SEG
                logger.info(f"series {image_id}: DICOM SEG stored on {self._root} as series {seg_series}")
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info or {})
        finally:
            if converted:
                os.unlink(converted)

    def datalist(self, full_path=True):
        with reported(self._root, "collecting the labelled series (QIDO-RS, WADO-RS)"):
            return super().datalist(full_path)

    def json(self):
        """The cache's objects, and every series of the server (those not downloaded yet too)."""
        data = super().json()
        for uid in self.list_images():
            data["objects"].setdefault(uid, {"image": {"ext": "", "info": {"SeriesInstanceUID": uid}}, "labels": {}})
        return data


class Bundle2DInferTask(BundleInferTask):
    """The bundle's /infer: every image (PNG/JPG slice, DICOM series, NIfTI volume) through the
    bundle's one ``predictor``, as ``tumorseg-predict`` and the bundle's inference run it
    (:meth:`infer_case`). ``probabilities``: MC-dropout scoring's task instead, which needs the
    network's sigmoid at its own resolution, so it runs MONAI Label's pipeline on the bundle's
    transforms (the shared preprocessing loads image and label; a request has the image only)."""

    def __init__(self, path, conf, probabilities=False, **kwargs):
        self.probabilities = probabilities
        super().__init__(path, conf, **kwargs)
        # one output channel holding a binary mask: its one label (channel_def "0") has the value 1
        if self.valid and len(self.labels) == 1:
            self.labels = {name: 1 for name in self.labels}
        if self.valid and self.network is not None:
            # model versioning: the shipped weights, then what training wrote; the last existing
            # one is served (BasicInferTask.get_path)
            self.path = [self.path[0], str(Path(path) / TRAINED / "model.pt")]
            # MONAI Label's per-request `model_filename` option names a file in models/ and would
            # always pick the shipped model.pt over the path list: left out
            self._config.pop("model_filename", None)

    def _load_bundle_config(self, path, config):
        return layered_config(path, config)

    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if isinstance(image, str) and not self.probabilities:
            return self.infer_case(request)
        return super().__call__(request, callbacks)

    _predictors: dict = {}
    _predictors_lock = threading.Lock()

    def volume_predictor(self):
        """The bundle's ``predictor`` (inference.yaml, as ``tumorseg-predict`` builds it) with the
        weights /infer serves (model versioning), built once per weights file and version."""
        from tumorseg.inference.predictor import Predictor

        checkpoint = Path(self.get_path())
        key = (str(self.bundle_path), str(checkpoint), checkpoint.stat().st_mtime_ns)
        with self._predictors_lock:
            if key not in self._predictors:
                self._predictors.clear()
                # the recipe's pair: a trained first stage with the refiner trained beside it
                refiner = checkpoint.parent / "refiner.pt"
                overrides = {"refiner_checkpoint": str(refiner)} if refiner.is_file() else {}
                self._predictors[key] = Predictor.from_bundle(Path(self.bundle_path), checkpoint, overrides)
            return self._predictors[key]

    def infer_case(self, request):
        """Any image of the datastore (a PNG/JPG slice, a DICOM series folder, a NIfTI volume)
        predicted as ``tumorseg-predict`` predicts it, through the bundle's one ``predictor``: the
        mask in the input's geometry, uint8 0/1, as its ``<name>_seg.png`` (a slice) or
        ``<name>_seg.nii.gz`` (a volume)."""
        from tumorseg.inference.predict import case_mask
        from tumorseg.io.reading import InputError, read_case
        from tumorseg.io.writing import mask_bytes

        start = time.time()
        try:
            predictor = self.volume_predictor()
            case = read_case(Path(request["image"]))
            mask = case_mask(predictor, case)[0]  # the one path of tumorseg-predict
        except InputError as e:
            raise PacsError(f"{Path(request['image']).name}: {e}", 422) from None
        with tempfile.NamedTemporaryFile(suffix=".png" if case.kind == "slice" else ".nii.gz", delete=False) as f:
            f.write(mask_bytes(case, mask))  # as tumorseg-predict writes it
        logger.info(f"Infer model path: {predictor.checkpoint}; volume {list(mask.shape)}, {int(mask.sum())} tumour voxels")
        return f.name, {
            "label_names": self.labels,
            "shape": list(mask.shape),
            "tumour_voxels": int(mask.sum()),
            "checkpoint": os.path.relpath(predictor.checkpoint, self.bundle_path),
            "latencies": {"total": round(time.time() - start, 2)},
        }

    def pre_transforms(self, data=None):
        transforms = super().pre_transforms(data)
        for t in transforms:
            if type(t).__name__ == "LoadImageTensord":
                t.keys = (self.key_image,)
        return transforms

    def post_transforms(self, data=None):
        post = super().post_transforms(data)
        if self.probabilities:  # by name: the bundle's classes are re-imported on every call
            post = [t for t in post if type(t).__name__ == "Activationsd"]
        return [*post, SqueezeDimd(keys=self.key_pred, dim=0)]

    def writer(self, data, extension=None, dtype=None):
        extension = extension or data.get("result_extension") or ".png"
        return super().writer(data, extension=extension, dtype=dtype or data.get("result_dtype") or "uint8")


class Bundle2DTrainTask(BundleTrainTask):
    """MONAI Label's bundle trainer running the bundle's training recipe (train.yaml's
    ``training``: every stage, as ``python -m monai.bundle run training`` runs it) on the labels
    of the datastore, writing into ``models/monailabel/`` of the bundle (``ckpt_dir``: the
    published ``model.pt`` and ``refiner.pt``, ``stages/``; ``output_dir``: ``eval/``), and
    ``train_stats.json`` there after each run, which ``stats()`` (``/info`` ``train_stats``) returns."""

    def _load_bundle_config(self, path, config):
        return layered_config(path, config)

    @property
    def trained(self) -> Path:
        return Path(self.bundle_path) / TRAINED

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        # the best model is saved by the validator: with too few labels to hold one out (2 labels
        # at val_split 0.2), validate on the training labels rather than on nothing
        if val == []:
            val = train
        # a labelled volume (a PACS series, a NIfTI) becomes its axial training slices, after the
        # partition: the slices of one series stay on one side
        slices: dict[str, list[dict]] = {}
        train, val = self._as_slices(train, slices), self._as_slices(val, slices) if val else val
        self._sizes = (len(train), len(val) if val else 0)
        return train, val

    def _as_slices(self, items, done: dict) -> list[dict]:
        out = []
        for item in items:
            if not is_volume(item["image"]):
                out.append(item)
                continue
            image = str(item["image"])
            if image not in done:
                name = Path(image).name.removesuffix(".gz").removesuffix(".nii")
                done[image] = volume_slices(image, item["label"], self.trained / "slices" / name)
            out.extend(done[image])
        return out

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # the recipe's first stage starts from init_weights, not from a loader handler MONAI Label
        # adds (every stage would load it, the refiner too): what /infer serves, the weights
        # trained last, else the shipped ones
        self._start_weights = None
        if not pretrained:
            return
        newest = self.trained / "model.pt"
        if newest.is_file() and Path(model_pytorch) == Path(self.bundle_path) / "models" / "model.pt":
            model_pytorch = str(newest)
        if Path(model_pytorch).is_file():
            self._start_weights = model_pytorch

    def _update_overrides(self, overrides):
        overrides["max_epochs"] = overrides.pop(self.const.key_train_trainer_max_epochs())  # every stage's
        overrides.update(
            {"ckpt_dir": str(self.trained), "output_dir": str(self.trained / "eval"), "init_weights": self._start_weights}
        )
        return overrides

    def run_single_gpu(self, request, overrides):
        # as MONAI Label's multi-GPU path does: the bundle's configs with its overrides merged into
        # one file, run by the bundle's command line (each stage of the recipe a process)
        config = layered_config(self.bundle_path, self.bundle_config_path)
        tracking = overrides.pop("tracking", None)  # a workflow setting, not a config key
        for key, value in overrides.items():
            config[key] = f"$torch.device('{value}')" if key == self.const.key_device() else value
        self.trained.mkdir(parents=True, exist_ok=True)
        merged = self.trained / "train_config.json"
        config.export_config_file(config.config, str(merged), indent=1)
        command = [sys.executable, "-m", "monai.bundle", "run", request.get("run_id") or "training",
                   "--config_file", json.dumps([str(merged)]), "--meta_file", self.bundle_metadata_path,
                   "--bundle_root", self.bundle_path] + (["--tracking", tracking] if tracking else [])  # fmt: skip
        subprocess.run(command, check=True)

    def __call__(self, request, datastore):
        start = time.time()
        self._start_weights, self._sizes = None, (0, 0)
        result = super().__call__(request, datastore)
        recipe = self.trained / "stages" / "recipe.json"
        metrics = self.trained / "eval" / "stages" / "segmentation" / "metrics.jsonl"
        epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        weights = self.trained / "model.pt"
        if epochs and weights.is_file() and recipe.is_file():
            best = max(epochs, key=lambda e: e.get("val_mean_dice", float("-inf")))
            stats = {
                "total_time": round(time.time() - start, 1),
                "stages": list(json.loads(recipe.read_text())["stages"]),
                "epochs": len(epochs),  # of the first stage
                "best_metric": best.get("val_mean_dice"),  # val_mean_dice, the bundle's key metric
                "best_metric_epoch": best["epoch"],
                "train_images": self._sizes[0],
                "val_images": self._sizes[1],
                "start_weights": os.path.relpath(self._start_weights, self.bundle_path) if self._start_weights else None,
                "weights": TRAINED.joinpath("model.pt").as_posix(),
                "sha256": file_digest(weights, None),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            path = self.trained / STATS
            path.with_suffix(".tmp").write_text(json.dumps(stats, indent=2))
            os.replace(path.with_suffix(".tmp"), path)  # the server reads it on every /info
        return result

    def stats(self):
        path = self.trained / STATS
        return json.loads(path.read_text()) if path.is_file() else {}


class SerialEpistemicScoring(EpistemicScoring):
    """MONAI Label's MC-dropout scoring, one image at a time: its default two threads race in the
    bundle task, which re-reads the bundle's configs on every call."""

    def __call__(self, request, datastore):
        return super().__call__({**request, "max_workers": 1}, datastore)


def close_cors() -> None:
    """MONAI Label allows every origin unless MONAI_LABEL_CORS_ORIGINS is set, and in 0.8.5 (with
    pydantic 2) setting it crashes `monailabel start_server` (it json-dumps the parsed URLs). Its
    FastAPI app exists before this file loads, so its CORS middleware is configured here, before
    the first request: the origins in TUMORSEG_CORS_ORIGINS (comma-separated), none by default."""
    server = sys.modules.get("monailabel.app")
    if server is None:  # a training or scoring subprocess: no HTTP server
        return
    from fastapi.middleware.cors import CORSMiddleware

    origins = [o.strip().rstrip("/") for o in os.environ.get("TUMORSEG_CORS_ORIGINS", "").split(",") if o.strip()]
    for middleware in server.app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = origins
    server.app.middleware_stack = None  # rebuilt from user_middleware on the next request
    logger.info(f"CORS allowed origins: {origins}")


class TumorSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = Path(app_dir) / "model"
        wanted = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        found = sorted(p for p in self.model_dir.glob("*") if (p / "configs").is_dir()) if self.model_dir.is_dir() else []
        self.bundles = {p.name: p for p in found if not wanted or p.name in wanted}
        if not self.bundles:
            raise RuntimeError(f"no exported bundle under {self.model_dir} (run `make monailabel-app`)")
        # sessions (uploaded images) under the app unless MONAI_LABEL_SESSION_PATH says otherwise;
        # MONAI Label's default is ~/.cache/monailabel/sessions. Read in MONAILabelApp.__init__.
        if not settings.MONAI_LABEL_SESSION_PATH:
            settings.MONAI_LABEL_SESSION_PATH = str(Path(app_dir).resolve() / "sessions")
        close_cors()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="tumorseg",
            description="Brain tumour segmentation on 2D MRI slices",
            version="0.1.0",
        )

    def init_remote_datastore(self):
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        return self._init_dicomweb_datastore()

    def _init_dicomweb_datastore(self):
        """:class:`SeriesDatastore` on the DICOMweb root ``--studies`` (MONAI Label's would download
        dcmqi from GitHub first: its SEG writer here is pydicom-seg), checked by one QIDO-RS
        search: a server that is unreachable or refuses the login stops the app in one line."""
        try:
            client = pacs_client(self.studies)
            with reported(self.studies, "searching the series (QIDO-RS)"):
                client.search_for_series(limit=1)
        except PacsError as e:
            print(f"error: MONAI Label cannot use the PACS: {e}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(2)  # inside uvicorn's start-up, where an exception would print its traceback
        search_filter = settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER
        if search_filter == {"Modality": "CT"}:  # MONAI Label's default; this model reads MR
            search_filter = {"Modality": "MR"}
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
        logger.info(f"DICOMweb datastore {self.studies}: series of {search_filter}, cache {cache or '(default)'}")
        return SeriesDatastore(client, search_filter, cache or None)

    def on_pacs(self) -> bool:
        return isinstance(self._datastore, SeriesDatastore)

    def init_infers(self):
        return {name: Bundle2DInferTask(str(path), self.conf) for name, path in self.bundles.items()}

    def init_trainers(self):
        return {name: Bundle2DTrainTask(str(path), self.conf) for name, path in self.bundles.items()}

    def init_strategies(self):
        if self.on_pacs():  # no epistemic scoring of volumes
            return {"random": Random(), "first": First()}
        return {"random": Random(), "first": First(), "epistemic": Epistemic()}

    def init_scoring_methods(self):
        if self.on_pacs():  # MC dropout scores 2D slices; it would download every series of the PACS
            return {}
        # MC dropout (the UNet has dropout): the network in train mode, several runs per unlabeled
        # image, the entropy of the mean sigmoid as the image's `epistemic_entropy`, which the
        # `epistemic` strategy ranks by. Instance norm behaves the same in train mode.
        path = next(iter(self.bundles.values()))
        task = Bundle2DInferTask(str(path), self.conf, probabilities=True, train_mode=True, skip_writer=True)
        return {"epistemic": SerialEpistemicScoring(task, simulation_size=5)}
