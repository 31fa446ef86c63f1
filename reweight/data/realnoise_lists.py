"""The list files of the real-world noisy benchmarks, parsed line by line: each parser checks its
dataset's published format (with the formats' quirks) and names the file, the line and where to
download it again in every error (:mod:`reweight.data.realnoise` builds the datasets from them)."""

from __future__ import annotations

import re
from pathlib import Path

from reweight.data.core import DATA_DIR_ENV

__all__ = [
    "DOWNLOADS",
    "food_classes",
    "food_keys",
    "missing_file",
    "parse_animal10n_name",
    "parse_filelist",
    "parse_ground_truth",
    "parse_key_list",
    "parse_label_kv",
    "parse_lines",
    "parse_synsets",
    "parse_verified_tsv",
]

DOWNLOADS = {  # where each dataset's files come from, named in every error
    "clothing1m": "https://github.com/Cysu/noisy_label (ask the authors for access)",
    "food101n": "https://kuanghuei.github.io/Food-101N/ (Food-101N_release.zip)",
    "food101": "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)",
    "animal10n": "https://dm.kaist.ac.kr/datasets/animal-10n/ (raw_image_ver.zip)",
    "webvision": "https://data.vision.ee.ethz.ch/cvl/webvision/download.html (WebVision 1.0, "
    "Google images + info + val_images_256)",
    "imagenet": "https://image-net.org/challenges/LSVRC/2012/ (ILSVRC2012_img_val.tar; "
    "ILSVRC2012_devkit_t12.tar.gz for the flat layout's labels)",
}


_WNID = re.compile(r"n\d{8}")  # a WordNet noun id, ImageNet's synset names


def missing_file(
    path: Path, what: str, source: str, folder: Path, key: str = f"dataset.root / {DATA_DIR_ENV}"
) -> FileNotFoundError:
    """One line: what is missing where, where to download it, where to put it (or ``key``)."""
    return FileNotFoundError(
        f"{what} not found: expected {path.resolve()}. Download it from {DOWNLOADS[source]} and "
        f"extract it into {folder.resolve()}, or set {key}"
    )


def parse_lines(path: Path, source: str, folder: Path) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of each non-blank line of ``path`` (1-based)."""
    if not path.is_file():
        raise missing_file(path, path.name, source, folder)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not a text file ({err.reason} at byte {err.start}): download it again "
            f"from {DOWNLOADS[source]}"
        ) from err
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _bad_line(path: Path, n: int, line: str, expected: str, source: str) -> ValueError:
    shown = line if len(line) <= 60 else line[:57] + "..."
    return ValueError(
        f"{path} line {n}: expected {expected}, got {shown!r}: the file is damaged, download it "
        f"again from {DOWNLOADS[source]}"
    )


def parse_label_kv(path: Path, num_classes: int, source: str, folder: Path) -> dict[str, int]:
    """Clothing1M's ``*_label_kv.txt`` (also WebVision's file lists): ``<image path> <label>`` per
    line, label in ``[0, num_classes)``. A path listed twice with two labels is an error."""
    out: dict[str, int] = {}
    expected = f"'<image path> <label 0-{num_classes - 1}>'"
    for n, line in parse_lines(path, source, folder):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= num_classes:
            raise _bad_line(path, n, line, expected, source)
        key, label = parts[0], int(parts[1])
        if out.setdefault(key, label) != label:
            raise _bad_line(path, n, line, f"one label for {key} (line before: {out[key]})", source)
    return out


def parse_filelist(
    path: Path, keep_below: int, source: str, folder: Path
) -> tuple[list[str], list[int]]:
    """WebVision's ``info/*_filelist*.txt``: ``<path> <label>`` per line (labels 0..999); only the
    lines with ``label < keep_below`` are kept, in file order."""
    paths: list[str] = []
    labels: list[int] = []
    for n, line in parse_lines(path, source, folder):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise _bad_line(path, n, line, "'<image path> <label>'", source)
        if int(parts[1]) < keep_below:
            paths.append(parts[0])
            labels.append(int(parts[1]))
    return paths, labels


def parse_synsets(path: Path, folder: Path) -> list[str]:
    """WebVision's ``info/synsets.txt``: ``<wnid> <words>`` per line (``n01440764 tench, Tinca
    tinca``), line ``c + 1`` naming class ``c``: the 1000 ILSVRC2012 synsets, distinct."""
    wnids: dict[str, None] = {}  # ordered, and a repeat is found at once
    for n, line in parse_lines(path, "webvision", folder):
        wnid = line.split()[0]
        if not _WNID.fullmatch(wnid) or wnid in wnids:
            raise _bad_line(path, n, line, "'<new wnid n########> <words>'", "webvision")
        wnids[wnid] = None
    if len(wnids) != 1000:
        raise ValueError(
            f"{path} lists {len(wnids)} synsets, WebVision has 1000: the file is damaged, "
            f"download it again from {DOWNLOADS['webvision']}"
        )
    return list(wnids)


def parse_ground_truth(path: Path, folder: Path) -> list[int]:
    """ILSVRC2012's devkit ``data/ILSVRC2012_validation_ground_truth.txt``: line ``n`` holds
    the ILSVRC2012_ID (1..1000, the devkit's ``meta.mat`` numbering, not the synsets' sorted
    order) of ``ILSVRC2012_val_<n, 8 digits>.JPEG``. Blank lines are not allowed: the line
    number is the image's."""
    if not path.is_file():
        what = "ILSVRC2012's validation ground truth"
        raise missing_file(path, what, "imagenet", folder, "dataset.imagenet_val_dir")
    ids: list[int] = []
    for n, line in enumerate(parse_lines(path, "imagenet", folder), 1):
        if line[0] != n or not line[1].isdigit() or not 1 <= int(line[1]) <= 1000:
            shown = (line[0], line[1]) if line[0] == n else (n, "(a blank line)")
            raise _bad_line(path, *shown, "one ILSVRC2012_ID 1-1000 per line", "imagenet")
        ids.append(int(line[1]))
    return ids


def parse_key_list(path: Path, source: str, folder: Path) -> list[str]:
    """Clothing1M's ``*_key_list.txt``: one image path per line, no spaces."""
    keys = []
    for n, line in parse_lines(path, source, folder):
        if len(line.split()) != 1:
            raise _bad_line(path, n, line, "one image path", source)
        keys.append(line)
    return keys


def parse_verified_tsv(path: Path, classes: list[str], folder: Path) -> list[tuple[str, int, int]]:
    """Food-101N's ``meta/verified_*.tsv`` (header ``class_name/key<TAB>verification_label``):
    ``(key, class index, verification label)`` per row. The class is the key's folder: the lists
    disagree on a few images' classes (a known quirk), so each list's own folder counts."""
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for n, line in parse_lines(path, "food101n", folder):
        if n == 1 and line.startswith("class_name"):
            continue  # the header
        parts = line.split("\t")
        ok = len(parts) == 2 and parts[1].strip() in ("0", "1") and "/" in parts[0]
        if not ok or parts[0].split("/")[0] not in index:
            raise _bad_line(
                path, n, line, "'<class_name>/<id>.jpg<TAB><0 or 1>' of a class", "food101n"
            )
        rows.append((parts[0], index[parts[0].split("/")[0]], int(parts[1])))
    return rows


def food_keys(path: Path, classes: list[str], folder: Path, source: str) -> list[tuple[str, int]]:
    """``imagelist.tsv`` (header ``class_name/key``) or Food-101's ``meta/test.txt`` (no header,
    no ``.jpg``): ``(key, class index)`` per line."""
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for n, line in parse_lines(path, source, folder):
        if n == 1 and line.startswith("class_name"):
            continue
        cls = line.split("/")[0]
        if "/" not in line or len(line.split()) != 1 or cls not in index:
            raise _bad_line(path, n, line, "'<class_name>/<id>' of a class", source)
        rows.append((line, index[cls]))
    return rows


def food_classes(path: Path, folder: Path, source: str) -> list[str]:
    """``classes.txt``: one class name per line; Food-101N's starts with the header
    ``class_name``, Food-101's has none."""
    lines = parse_lines(path, source, folder)
    names = [line for n, line in lines if not (n == 1 and line == "class_name")]
    if len(names) != 101 or len(set(names)) != 101:
        raise ValueError(
            f"{path} lists {len(set(names))} distinct classes, Food-101 has 101: the file is "
            f"damaged, download it again from {DOWNLOADS[source]}"
        )
    return names


def parse_animal10n_name(name: str) -> int:
    """ANIMAL-10N's file name ``<label>_<id>.jpg`` (label first, 0..9) -> the label."""
    stem, _, ext = name.rpartition(".")
    label, sep, ident = stem.partition("_")
    if ext.lower() != "jpg" or not sep or not label.isdigit() or int(label) > 9 or not ident:
        raise ValueError(
            f"{name!r} is not an ANIMAL-10N image name '<label 0-9>_<id>.jpg': remove it or "
            f"extract ANIMAL-10N again from {DOWNLOADS['animal10n']}"
        )
    return int(label)
