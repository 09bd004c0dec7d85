"""A real PACS for the tests: Debian's Orthanc (``apt-get install orthanc orthanc-dicomweb``) with
its DICOMweb plugin, run as a plain process on free ports of 127.0.0.1 (HTTP and DICOM), with a
temporary storage folder, its own JSON config (remote access refused, HTTP basic authentication
with one generated test user) and a Lua filter that refuses the DICOM SEGs of two test patients
(``REFUSE_SEG``, ``DROP_SEG``). Stopped by its PID.

``make pacs-serve`` runs one to try ``tumorseg-predict URL`` on (no Lua filter, the login
of ``TUMORSEG_DICOMWEB_USER``/``TUMORSEG_DICOMWEB_PASSWORD``):

    python tests/pacs_server.py FOLDER [HTTP_PORT [DICOM_PORT]]
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")  # the Debian package's plugin folder
DICOMWEB_PLUGIN = PLUGINS / "libOrthancDicomWeb.so"  # from orthanc-dicomweb
# Lua filters of what the server refuses to store, as a real PACS may: a DICOM SEG of patient
# REFUSE_SEG fails inside the filter (Orthanc 1.10's STOW-RS then answers 200 without the instance
# in ReferencedSOPSequence); one of patient DROP_SEG is filtered out (answered 200 *with* it listed
# as stored, yet not stored: only a QIDO-RS look-up tells).
REFUSE_SEG, DROP_SEG = "REFUSE-SEG", "DROP-SEG"
LUA_FILTER = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == "SEG" and dicom.PatientID == "{REFUSE_SEG}" then
    error("this test server refuses DICOM SEGs of patient {REFUSE_SEG}")
  end
  return not (dicom.Modality == "SEG" and dicom.PatientID == "{DROP_SEG}")
end
"""


def available() -> bool:
    return Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file()


@dataclass
class Pacs:
    url: str  # Orthanc's REST root, http://127.0.0.1:<port>
    user: str
    password: str
    process: subprocess.Popen

    @property
    def root(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.url}/dicom-web"

    def client(self):
        from dicomweb_client import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        return DICOMwebClient(self.root, session=create_session_from_user_pass(self.user, self.password))

    def counts(self) -> dict[str, int]:
        """Orthanc's own count of what it stores: CountStudies, CountSeries, CountInstances..."""
        answer = requests.get(f"{self.url}/statistics", auth=(self.user, self.password), timeout=10)
        answer.raise_for_status()
        return {k: int(v) for k, v in answer.json().items() if k.startswith("Count")}


@contextmanager
def orthanc(
    folder: Path, http_port: int, dicom_port: int, login: tuple[str, str] | None = None, filters: bool = True
) -> Iterator[Pacs]:
    """Orthanc serving from ``folder`` (created if need be) until the block ends; ``login``
    (user, password) by default a generated one; ``filters``: the Lua filter of the test patients."""
    folder.mkdir(parents=True, exist_ok=True)
    user, password = login or ("tester", secrets.token_urlsafe(12))
    if filters:
        (folder / "filter.lua").write_text(LUA_FILTER)
    config = {
        "Name": "tumorseg-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "TUMORSEGTEST",
        "DicomAlwaysAllowStore": False,  # the DICOM port listens on every interface: accept nothing there
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "LuaScripts": [str(folder / "filter.lua")] if filters else [],
        "SaveJobs": False,
        "HttpThreadsCount": 4,
        "ConcurrentJobs": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115  (closed below)
    process = subprocess.Popen(
        [ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    pacs = Pacs(f"http://127.0.0.1:{http_port}", user, password, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({process.returncode}): {(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{pacs.url}/system", auth=(user, password), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within 60 s: {(folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield pacs
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def store_sample_series(
    root: str, login: tuple[str, str], folder: Path, slices: int = 4, affine=None, **attributes
) -> tuple[str, str]:
    """The embedded sample's first test slices (256 px), stacked, as an MR series written by
    ``data_tools.nifti_to_dicom`` into ``folder`` with ``affine`` (voxel -> RAS; default: the
    slices as displayed, axial, 1 mm), each instance changed by ``attributes``, stored by STOW-RS
    on the DICOMweb ``root``; returns (StudyInstanceUID, SeriesInstanceUID). ``make pacs-label``
    stores one to label."""
    import numpy as np
    import pydicom
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass
    from PIL import Image

    from data_tools.nifti_to_dicom import write_series

    sample = Path(__file__).resolve().parents[1] / "data" / "brain-tumor-coco-sample" / "test"
    images = [np.asarray(Image.open(p).convert("L").resize((256, 256)), dtype=np.float32) for p in sorted(sample.glob("*.jpg"))]
    if affine is None:  # (x = columns, y = rows) of each slice, LPS: displayed as it is
        volume, affine = np.stack([im.T for im in images[:slices]], -1), np.diag([-1.0, -1.0, 1.0, 1.0])
    else:  # (rows, columns) as stored; the affine says where they lie
        volume = np.stack(images[:slices], -1)
    datasets = [pydicom.dcmread(f) for f in write_series(volume, np.asarray(affine, dtype=float), folder)]
    for ds in datasets:
        for name, value in attributes.items():
            setattr(ds, name, value)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    web = DICOMwebClient(root, session=create_session_from_user_pass(*login))
    answer = web.store_instances(datasets)
    if len(answer.ReferencedSOPSequence) != len(datasets):
        raise RuntimeError(f"{root}: stored {len(answer.ReferencedSOPSequence)} of {len(datasets)} instances")
    return str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)


def wait_until_serving(root: str, login: tuple[str, str], timeout: float = 60) -> None:
    """Return once the DICOMweb ``root`` answers a QIDO-RS search with ``login``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(f"{root}/studies", auth=login, timeout=2).raise_for_status()
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{root}: no answer to QIDO-RS within {timeout:g} s") from None
            time.sleep(0.5)


def ensure_sample_series(root: str, login: tuple[str, str]) -> None:
    """Where the server holds no MR series: one of the sample (:func:`store_sample_series`)."""
    import tempfile

    answer = requests.get(f"{root}/series", params={"Modality": "MR"}, auth=login, timeout=30)
    answer.raise_for_status()
    if answer.status_code == 200 and answer.content.strip() not in (b"", b"[]"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        study, series = store_sample_series(root, login, Path(tmp) / "series")
    print(f"stored a sample MR series on {root}: study {study}, series {series}")


if __name__ == "__main__":
    args = sys.argv[1:]
    login = os.environ.get("TUMORSEG_DICOMWEB_USER"), os.environ.get("TUMORSEG_DICOMWEB_PASSWORD")
    if not 1 <= len(args) <= 3 or not all(login):
        sys.exit(
            "usage: python tests/pacs_server.py FOLDER [HTTP_PORT [DICOM_PORT]], login from TUMORSEG_DICOMWEB_USER/_PASSWORD"
        )
    ports = [int(p) for p in args[1:]] + [8042, 4242][len(args) - 1 :]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped by its PID: Orthanc stops too
    with orthanc(Path(args[0]), ports[0], ports[1], (login[0] or "", login[1] or ""), filters=False) as pacs:
        print(f"Orthanc (PID {pacs.process.pid}) serving DICOMweb at {pacs.root}/, storage in {args[0]}; Ctrl-C stops it")
        try:
            pacs.process.wait()
        except KeyboardInterrupt:
            pass
