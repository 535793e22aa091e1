"""``multvae data download NAME``: fetch a public dataset, check it, unpack it for ``--data``.

    GET <base>/<archive>  (Range: resume a .part file)  ─> sha256 check ─> unzip ─> DIR/NAME/

The sha256 digests and sizes of the MovieLens archives are the ones TensorFlow Datasets
records for the same URLs (``tensorflow_datasets/url_checksums/movielens.txt``); GroupLens
itself publishes MD5 files only. No sha256 of the Million Song Dataset's taste profile
(``train_triplets.txt.zip``) could be established from a published source, so none is
recorded here: the command then prints the digest of what it downloaded, and ``--sha256``
checks it against one the user trusts. ``ml-latest-small`` is a "latest" release that
GroupLens may replace; a replaced archive fails the check by design (``--sha256`` accepts
a new digest deliberately).

``MULTVAE_DATA_BASE_URL`` (or ``--base-url``) fetches every archive from a mirror instead,
under its usual file name; the tests serve fixture archives this way.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from multvae.errors import DataError

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
MSD = "http://millionsongdataset.com/sites/default/files/challenge"
BASE_URL_ENV = "MULTVAE_DATA_BASE_URL"
MARKER = ".multvae-download.json"
CHUNK = 1 << 20
ATTEMPTS = 3  # each later attempt resumes where the previous one stopped


@dataclass(frozen=True)
class Dataset:
    base: str
    archive: str
    size: int | None
    sha256: str | None  # None: no published digest could be established (see module doc)
    preset: str | None  # the --preset that reproduces the paper's / REFERENCE split
    about: str


DATASETS: dict[str, Dataset] = {
    "ml-100k": Dataset(
        GROUPLENS, "ml-100k.zip", 4_924_029,
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", "ml-100k",
        "MovieLens 100K: 100,000 ratings, 943 users, 1,682 movies",
    ),
    "ml-1m": Dataset(
        GROUPLENS, "ml-1m.zip", 5_917_549,
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", None,
        "MovieLens 1M: 1 million ratings, 6,040 users, 3,706 movies",
    ),
    "ml-20m": Dataset(
        GROUPLENS, "ml-20m.zip", 198_702_078,
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", "ml-20m",
        "MovieLens 20M: the paper's ML-20M",
    ),
    "ml-25m": Dataset(
        GROUPLENS, "ml-25m.zip", 261_978_986,
        "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", None,
        "MovieLens 25M: 25 million ratings, 162,541 users",
    ),
    "ml-latest-small": Dataset(
        GROUPLENS, "ml-latest-small.zip", 978_202,
        "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436", "ml-latest-small",
        "MovieLens latest-small: 100,836 ratings, 610 users (a release GroupLens may update)",
    ),
    "msd": Dataset(
        MSD, "train_triplets.txt.zip", None, None, "msd",
        "Million Song Dataset, Echo Nest taste profile: the paper's MSD (about 500 MB zipped)",
    ),
}


def _url(dataset: Dataset, base_url: str | None) -> str:
    return f"{(base_url or dataset.base).rstrip('/')}/{dataset.archive}"


def _offline(url: str, reason: object) -> DataError:
    return DataError(
        f"cannot reach {url} ({reason}): this machine looks offline or the host is blocked. "
        f"Fetch the file elsewhere and pass it with --archive FILE, or set {BASE_URL_ENV} "
        "(or --base-url) to a mirror that has it"
    )


def _fetch(url: str, part: Path, size: int | None, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming from its current length with an HTTP Range."""
    from tqdm import tqdm

    for attempt in range(1, ATTEMPTS + 1):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            return
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = response.status == 206
                if have and not resumed:
                    have = 0  # the server ignored the Range: start over
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                with part.open("ab" if resumed else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
                    desc=part.name.removesuffix(".part"),
                ) as bar:  # fmt: skip
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            if total is None or part.stat().st_size >= total:
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left past what we have
                return
            raise DataError(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            if part.exists() and part.stat().st_size > 0 and attempt < ATTEMPTS:
                continue
            raise _offline(url, exc.reason) from exc
        except (http.client.HTTPException, OSError) as exc:
            if attempt == ATTEMPTS:
                raise DataError(
                    f"the download of {url} broke off ({exc}) {ATTEMPTS} times; "
                    f"{part} keeps what arrived: run the same command again to resume"
                ) from exc
        print(f"connection lost; resuming (attempt {attempt + 1} of {ATTEMPTS})", file=sys.stderr)
    raise DataError(
        f"the download of {url} stayed short of its length after {ATTEMPTS} attempts; "
        f"{part} keeps what arrived: run the same command again to resume"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(archive: Path, target: Path) -> None:
    """Unzip into ``target``: the archive's single top folder becomes ``target`` itself."""
    staging = target.with_name(f".{target.name}.extract")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                member = PurePosixPath(name)
                if member.is_absolute() or ".." in member.parts:
                    raise DataError(f"{archive} holds an unsafe path {name!r}; not extracted")
            zf.extractall(staging)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive} is not a zip archive ({exc})") from exc
    entries = [p for p in staging.iterdir() if not p.name.startswith("__MACOSX")]
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
    shutil.rmtree(target, ignore_errors=True)
    os.replace(root, target)
    shutil.rmtree(staging, ignore_errors=True)


def download(
    name: str,
    to: Path,
    *,
    base_url: str | None = None,
    sha256: str | None = None,
    archive: Path | None = None,
    progress: bool = False,
) -> tuple[Path, str]:
    """Fetch (or take ``archive``), verify and unpack dataset ``name`` under ``to``.

    Returns (the directory for ``multvae train --data``, the archive's sha256).
    """
    dataset = DATASETS[name]
    expected = sha256.lower() if sha256 else dataset.sha256
    target = to / name
    marker = target / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("sha256")
        if expected is None or recorded == expected:
            print(f"{target} is already there (sha256 {recorded}); nothing to do")
            return target, str(recorded)
    to.mkdir(parents=True, exist_ok=True)
    url = _url(dataset, base_url)
    if archive is None:
        part = to / f"{dataset.archive}.part"
        print(f"downloading {url} -> {to}", flush=True)
        _fetch(url, part, dataset.size, progress)
        source = part
    else:
        source = archive
    actual = _sha256(source)
    if expected is not None and actual != expected:
        if archive is None:
            source.unlink()  # a corrupt download must not be resumed
        raise DataError(
            f"{url if archive is None else archive} has sha256 {actual}, expected {expected}: "
            "the file is corrupt or not the published release"
            + ("; the partial file was removed, run the command again" if archive is None else "")
        )
    if expected is None:
        print(
            f"no published sha256 is known for {name}; the archive's is {actual}: compare it "
            "with a copy you trust, and pass --sha256 to check it next time",
            file=sys.stderr,
        )
    _extract(source, target)
    (target / MARKER).write_text(json.dumps({"url": url, "sha256": actual}) + "\n")
    if archive is None:
        source.unlink()
    return target, actual


def download_command(args: argparse.Namespace) -> int:
    base_url = args.base_url or os.environ.get(BASE_URL_ENV) or None
    target, digest = download(
        args.name, Path(args.to), base_url=base_url, sha256=args.sha256,
        archive=Path(args.archive) if args.archive else None, progress=not args.quiet,
    )  # fmt: skip
    preset = DATASETS[args.name].preset
    print(f"{args.name}: {target} (sha256 {digest})")
    print(
        f"train on it: multvae train --data {target}"
        + (f" --preset {preset}" if preset else "")
        + " --out models"
    )
    return 0
