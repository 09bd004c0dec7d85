"""Series on a PACS as inputs of ``tumorseg-predict``, and their DICOM SEGs stored back (DICOMweb).

An input is a WADO-RS address: a series (``http://host:port/dicom-web/studies/<StudyUID>/series/
<SeriesUID>``) or a study (``.../studies/<StudyUID>``: each of its MR series; other modalities are
skipped with a note). :func:`fetch` finds the series by QIDO-RS and downloads each one's instances
by WADO-RS into a folder of its own, which ``tumorseg-predict`` predicts as a local DICOM series;
:func:`store_case` sends the case's DICOM SEG (which references the source series) by STOW-RS to
the server's DICOMweb root, checks by QIDO-RS that the server holds it, and records in the case's
JSON summary what was stored (its SOPInstanceUID, the server) or why it was not.

Settings come from the environment, never from the command line: ``TUMORSEG_DICOMWEB_USER`` and
``TUMORSEG_DICOMWEB_PASSWORD`` (HTTP basic authentication; without them, requests reads the host's
entry of ``~/.netrc`` or of the file ``NETRC`` names) and ``TUMORSEG_DICOMWEB_TIMEOUT`` (seconds
to wait for the server to connect and between bytes of an answer, default 30; requests' timeout,
not a bound on a whole download). A URL with credentials in it (``user:password@``) is refused. Each
request is tried once; every failure is one line naming the URL and the problem.

    tumorseg-predict URL [URL ...] [local inputs] --output DIR [options]
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.io.files import show

USER_ENV, PASSWORD_ENV, TIMEOUT_ENV = "TUMORSEG_DICOMWEB_USER", "TUMORSEG_DICOMWEB_PASSWORD", "TUMORSEG_DICOMWEB_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
UID = r"[0-9]+(?:\.[0-9]+)*"
ADDRESS = re.compile(rf"(?P<prefix>.*?)/studies/(?P<study>{UID})(?:/series/(?P<series>{UID}))?/?")
SERIES_UID, MODALITY, SOP_INSTANCE_UID = "0020000E", "00080060", "00080018"  # DICOM JSON tags (QIDO-RS)


class DicomwebError(Exception):
    """A URL that cannot be fetched from or stored to; one line naming the URL and the problem."""


def is_url(text: str) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class FetchedSeries:
    """One series downloaded from a DICOMweb server: ``folder`` holds its instances."""

    folder: Path
    root: str  # the server's DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), without credentials
    study_uid: str
    series_uid: str
    instances: int

    @property
    def url(self) -> str:  # its WADO-RS address
        return f"{self.root}/studies/{self.study_uid}/series/{self.series_uid}"


def parse_url(url: str) -> tuple[str, str, str | None]:
    """``(root, study_uid, series_uid or None)`` of a study or series address."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as e:  # e.g. "Invalid IPv6 URL"
        raise DicomwebError(f"{url}: not a valid URL ({e})") from None
    try:
        base = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a port that is not a number
        raise DicomwebError(f"{parts.scheme}://{host}: not a valid port in this URL") from None
    if parts.username is not None or parts.password is not None:
        raise DicomwebError(
            f"{base}{parts.path}: credentials in a URL are refused; set {USER_ENV} and {PASSWORD_ENV}, or use netrc"
        )
    match = ADDRESS.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment or not match:
        raise DicomwebError(f"{base}{parts.path}: not a DICOMweb study or series address (.../studies/<UID>[/series/<UID>])")
    return base + match["prefix"], match["study"], match["series"]


def timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise DicomwebError(f"{TIMEOUT_ENV}={raw!r}: not a positive number of seconds")
    return value


def client(root: str):
    """A ``dicomweb_client.DICOMwebClient`` for ``root`` with the settings of the environment."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()  # without auth set, requests takes the host's netrc entry
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user or password:
        if not (user and password):
            raise DicomwebError(f"{root}: set both {USER_ENV} and {PASSWORD_ENV}, or neither (netrc)")
        session.auth = (user, password)
    web = DICOMwebClient(root, session=session, timeout=timeout())
    web.set_http_retry_params(retry=False)  # one attempt: a failure is reported at once
    return web


@contextmanager
def reported(url: str, doing: str) -> Iterator[None]:
    """Turn what requests raises into a :class:`DicomwebError` line naming ``url``."""
    import requests

    try:
        yield
    except requests.exceptions.Timeout:
        raise DicomwebError(f"{url}: no answer within {timeout():g} s while {doing} (a slow server? {TIMEOUT_ENV})") from None
    except requests.exceptions.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status in (401, 403):
            problem = f"authentication refused (HTTP {status}); check {USER_ENV}/{PASSWORD_ENV} or the netrc entry"
        elif status == 404:
            problem = f"not found on the server (HTTP 404) while {doing}"
        else:
            problem = f"the server answered HTTP {status} while {doing}"
        raise DicomwebError(f"{url}: {problem}") from None
    except requests.exceptions.RequestException as e:
        if "timed out" in str(e):  # a read timeout inside the body comes as a ConnectionError
            raise DicomwebError(f"{url}: no answer within {timeout():g} s while {doing} (a slow server? {TIMEOUT_ENV})") from None
        reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
        raise DicomwebError(f"{url}: server unreachable ({reason[1] if reason else e.__class__.__name__})") from None


def _value(item: dict, tag: str) -> str:
    return str((item.get(tag, {}).get("Value") or [""])[0])


def fetch(url: str, workdir: Path) -> tuple[list[FetchedSeries], list[str]]:
    """The MR series that ``url`` (a study or series address) names, each downloaded into
    ``workdir/<SeriesUID>/`` (created); and one error line per series or URL that yields none.
    Series of other modalities in a study are skipped with a ``note:`` line on stderr."""
    try:
        root, study, series = parse_url(url)
        web = client(root)
        filters = {"SeriesInstanceUID": series} if series else None
        with reported(url, "searching the series (QIDO-RS)"):
            found = web.search_for_series(study, search_filters=filters)
        if not found:
            raise DicomwebError(f"{url}: no such {'series' if series else 'study'} on the server (QIDO-RS found none)")
    except DicomwebError as e:
        return [], [str(e)]
    fetched, errors = [], []
    for item in found:
        uid, modality = _value(item, SERIES_UID), _value(item, MODALITY)
        where = f"{root}/studies/{study}/series/{uid}"
        if modality != "MR":
            if series:
                errors.append(f"{where}: a {modality or 'modality-less'} series, not MR: nothing to predict")
            else:
                print(f"note: {show(where)}: skipped, a {modality or 'modality-less'} series (not MR)", file=sys.stderr)
            continue
        try:
            fetched.append(_download(web, root, study, uid, Path(workdir) / uid))
        except DicomwebError as e:
            errors.append(str(e))
    if not fetched and not errors:
        errors.append(f"{url}: no MR series in this study")
    return fetched, errors


def _download(web, root: str, study: str, series: str, folder: Path) -> FetchedSeries:
    where = f"{root}/studies/{study}/series/{series}"
    with reported(where, "downloading the series (WADO-RS)"):
        datasets = web.retrieve_series(study, series)
    if not datasets:
        raise DicomwebError(f"{where}: the server sent no instances")
    folder.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        try:
            ds.pixel_array  # noqa: B018  (decode now, so a broken instance is reported with the URL)
            ds.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)
        except Exception as e:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            uid = ds.get("SOPInstanceUID", f"#{i + 1}")
            raise DicomwebError(f"{where}: unreadable instance {uid} ({e.__class__.__name__}: {detail})") from None
    return FetchedSeries(folder, root, study, series, len(datasets))


def store_seg(fetched: FetchedSeries, seg_path: Path) -> str:
    """Store the DICOM SEG at ``seg_path`` (made from ``fetched``) by STOW-RS on its server;
    returns its SOPInstanceUID once QIDO-RS finds it there. Raises :class:`DicomwebError`."""
    import pydicom

    try:
        seg = pydicom.dcmread(seg_path)
        uid = str(seg.SOPInstanceUID)
        referenced = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
        ours = seg.get("Modality") == "SEG" and str(seg.StudyInstanceUID) == fetched.study_uid
    except Exception:  # not DICOM, or a DICOM file without those attributes
        ours = False
    if not ours or fetched.series_uid not in referenced:
        raise DicomwebError(f"{fetched.url}: {seg_path} is not a DICOM SEG of this series; not stored")
    web = client(fetched.root)
    with reported(fetched.url, "storing the DICOM SEG (STOW-RS)"):
        answer = web.store_instances([seg])
        failed = [s for s in answer.get("FailedSOPSequence", []) if str(s.get("ReferencedSOPInstanceUID")) == uid]
        if failed:
            reason = failed[0].get("FailureReason", "none given")
            raise DicomwebError(f"{fetched.url}: the server refused the DICOM SEG (STOW-RS failure reason {reason})")
        if uid not in {str(s.get("ReferencedSOPInstanceUID")) for s in answer.get("ReferencedSOPSequence", [])}:
            raise DicomwebError(f"{fetched.url}: the server did not confirm storing the DICOM SEG (STOW-RS)")
    with reported(fetched.url, "checking that the server holds the DICOM SEG (QIDO-RS)"):
        held = web.search_for_instances(fetched.study_uid, str(seg.SeriesInstanceUID), search_filters={"SOPInstanceUID": uid})
        if uid not in {_value(item, SOP_INSTANCE_UID) for item in held}:
            raise DicomwebError(f"{fetched.url}: the server confirmed the STOW-RS but does not hold the DICOM SEG (QIDO-RS)")
    return uid


def case_summary(folder: Path, output: Path) -> Path | None:
    """The JSON summary that ``tumorseg-predict`` wrote into ``output`` for the DICOM series folder
    ``folder`` (its ``input``): ``<folder name>.json`` if that is the one, else the one among the
    files its manifest lists; None if there is none."""
    from tumorseg.io.writing import OutputFolder

    try:
        listed = sorted(json.loads((Path(output) / OutputFolder.MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        listed = []
    for name in [f"{folder.name}.json", *(n for n in listed if n.endswith(".json") and n != OutputFolder.MANIFEST)]:
        try:
            if json.loads((Path(output) / name).read_text()).get("input") == str(folder):
                return Path(output) / name
        except (OSError, ValueError, AttributeError):
            continue
    return None


def store_case(fetched: FetchedSeries, output: Path) -> str | None:
    """Store the DICOM SEG that ``tumorseg-predict`` made in ``output`` from ``fetched.folder``
    and record the outcome in the case's summary, whose ``input`` becomes the series' URL. Returns
    None, or the error line (the local outputs stay)."""
    from tumorseg.io.writing import OutputError, OutputFolder

    path = case_summary(fetched.folder, output)
    try:
        summary: dict[str, Any] = json.loads(path.read_text()) if path else {}
        seg = summary["outputs"]["dicom_seg"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{fetched.url}: not predicted (no summary with a DICOM SEG in {output}); nothing stored"
    assert path is not None
    record: dict[str, Any] = {"source": fetched.url, "server": fetched.root}
    problem = None
    try:
        record |= {"stored": True, "seg_sop_instance_uid": store_seg(fetched, Path(seg))}
    except DicomwebError as e:
        problem = f"{e}; the DICOM SEG was not stored, the local outputs stay in {output}"
        record |= {"stored": False, "error": str(e)}
    summary |= {"input": fetched.url, "dicomweb": record}
    try:
        OutputFolder(Path(output)).write({path: (json.dumps(summary, indent=1) + "\n").encode()})
    except OutputError as e:
        return problem or f"{fetched.url}: stored as {record.get('seg_sop_instance_uid')}, but the summary was not updated ({e})"
    return problem


def predict_with_urls(argv: list[str]) -> int:
    """``tumorseg-predict`` with study or series URLs among its inputs (beside local ones or
    alone): fetch each URL's MR series, predict them with the local inputs in one run, store
    each series' DICOM SEG back on its server. Options are checked before any request."""
    import tempfile

    from tumorseg.inference.predict import build_parser
    from tumorseg.inference.predict import main as predict_main

    urls = [word for word in argv if is_url(word)]
    rest = [word for word in argv if not is_url(word)]
    parsed = build_parser().parse_intermixed_args([*rest, "placeholder"])  # options checked before any request
    output, local_inputs = parsed.output, parsed.inputs[:-1]
    if output.exists() and not output.is_dir():  # refused before any request, as tumorseg-predict does
        print(f"error: {output}: the output must be a folder, and this is a file", file=sys.stderr)
        return 2
    failed = 0
    with tempfile.TemporaryDirectory(prefix="tumorseg-dicomweb-") as tmp:
        fetched: list[FetchedSeries] = []
        for i, url in enumerate(urls):
            series, errors = fetch(url, Path(tmp) / str(i))
            for line in errors:
                print(f"error: {show(line)}", file=sys.stderr)
            failed += len(errors)
            for f in series:
                if f.series_uid in {g.series_uid for g in fetched}:
                    print(f"note: {show(f.url)}: named more than once: predicted once", file=sys.stderr)
                else:
                    fetched.append(f)
        if not fetched and not local_inputs:
            return 1
        for f in fetched:
            print(f"fetched {f.instances} instances of {show(f.url)} into {show(f.folder)}")
        status = predict_main([*(str(f.folder) for f in fetched), *rest])
        stored = 0
        for f in fetched:
            problem = store_case(f, output)
            if problem:
                print(f"error: {show(problem)}", file=sys.stderr)
                failed += 1
            else:
                stored += 1
        if fetched:
            print(f"{stored} of {len(fetched)} DICOM SEGs stored")
    return 1 if failed or status else 0
