"""Small replicas of the real-world noisy datasets' published layouts (real file names, real list
formats, a few dozen tiny JPEGs), written by the tests into a temporary folder."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

CLOTHING_NAMES = [
    "T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
    "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear",
]  # fmt: skip


def jpg(path: Path, shade: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade % 256, (3 * shade) % 256, (7 * shade) % 256)).save(
        path, "JPEG"
    )


def write_clothing1m(root: Path) -> dict[str, int]:
    """<root>/clothing1m: annotations/ with the kv files and key lists, images/<a>/<b>/<n>.jpg.
    Per class: 3 noisy training images, 3 clean validation images, 1 clean test image; and 2
    noisy-train keys with no entry in noisy_label_kv.txt (the known quirk)."""
    d = root / "clothing1m"
    ann = d / "annotations"
    ann.mkdir(parents=True)
    noisy, clean, lists = [], [], {"noisy_train": [], "clean_val": [], "clean_test": []}
    n = 0
    for c in range(14):
        for part, count in (("noisy_train", 3), ("clean_val", 3), ("clean_test", 1)):
            for _ in range(count):
                key = f"images/{n % 10}/{n % 7}{n % 3}/{1000 + n}.jpg"
                jpg(d / key, 10 * c + n)
                lists[part].append(key)
                if part == "noisy_train":
                    noisy.append(f"{key} {(c + n) % 14}")  # noisy labels
                else:
                    clean.append(f"{key} {c}")
                n += 1
    lists["noisy_train"][3:3] = ["images/9/99/unlabelled1.jpg", "images/9/99/unlabelled2.jpg"]
    (ann / "noisy_label_kv.txt").write_text("\n".join(noisy) + "\n")
    (ann / "clean_label_kv.txt").write_text("\n".join(clean) + "\n")
    for part, keys in lists.items():
        (ann / f"{part}_key_list.txt").write_text("\n".join(keys) + "\n")
    (ann / "clean_train_key_list.txt").write_text("")
    (ann / "category_names_eng.txt").write_text("\n".join(CLOTHING_NAMES) + "\n")
    return {"train": 42, "skipped": 2, "val_pool": 42, "test": 14}


FOOD = [f"food_{i:03d}" for i in range(101)]


def write_food101n(root: Path) -> dict[str, int]:
    """<root>/Food-101N_release/meta/{classes.txt,imagelist.tsv,verified_train.tsv,verified_val.tsv},
    images/<class>/<id>.jpg; <root>/food-101/meta/{classes.txt,test.txt}, images/. Per class: 4
    listed images, of which 3 verified (2 with label 1, 1 with label 0); 1 Food-101 test image."""
    d, f = root / "Food-101N_release", root / "food-101"
    (d / "meta").mkdir(parents=True)
    (f / "meta").mkdir(parents=True)
    listed, verified, test = ["class_name/key"], ["class_name/key\tverification_label"], []
    for c, name in enumerate(FOOD):
        for i in range(4):
            key = f"{name}/{c:03d}{i}abcdef.jpg"
            jpg(d / "images" / key, c + i)
            listed.append(key)
            if i < 3:
                verified.append(f"{key}\t{1 if i < 2 else 0}")
        jpg(f / "images" / name / f"{900 + c}.jpg", c)
        test.append(f"{name}/{900 + c}")
    (d / "meta" / "classes.txt").write_text("class_name\n" + "\n".join(FOOD) + "\n")
    (d / "meta" / "imagelist.tsv").write_text("\n".join(listed) + "\n")
    (d / "meta" / "verified_train.tsv").write_text("\n".join(verified) + "\n")
    (d / "meta" / "verified_val.tsv").write_text(verified[0] + "\n")
    (f / "meta" / "classes.txt").write_text("\n".join(FOOD) + "\n")
    (f / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    return {"listed": 404, "verified_correct": 202, "test": 101}


def write_animal10n(root: Path, per_class: int = 6, test_per_class: int = 2) -> None:
    """<root>/animal10n/training/<label>_<id>.jpg and testing/<label>_<id>.jpg, 64x64 as released
    (16x16 here)."""
    n = 0
    for split, count in (("training", per_class), ("testing", test_per_class)):
        for c in range(10):
            for _ in range(count):
                jpg(root / "animal10n" / split / f"{c}_{n:05d}.jpg", 20 * c + n, size=16)
                n += 1


def wnid(c: int) -> str:
    """The replica's synset of class ``c`` (``n########``, increasing with ``c`` as WebVision's
    synsets.txt lists ILSVRC2012's, sorted)."""
    return f"n{1440764 + 1000 * c:08d}"


def write_mini_webvision(root: Path) -> dict[str, int]:
    """<root>/webvision/info/{train_filelist_google.txt,val_filelist.txt} over 52 classes (the
    lines of classes 50 and 51 are not mini-WebVision's), info/synsets.txt (1000 lines
    '<wnid> <words>'); google/q<class>/<name>.jpg and val_images_256/<name>.jpg. Per class: 2
    training images, 4 validation images."""
    d = root / "webvision"
    (d / "info").mkdir(parents=True)
    words = "\n".join(f"{wnid(c)} class {c}, words" for c in range(1000))
    (d / "info" / "synsets.txt").write_text(words + "\n")
    train, val = [], []
    for c in range(52):
        for i in range(2):
            path = f"google/q{c + 1:04d}/{c}_{i}.jpg"
            if c < 50:
                jpg(d / path, c + i)
            train.append(f"{path} {c}")
        for i in range(4):
            name = f"val{c * 4 + i:06d}.jpg"
            if c < 50:
                jpg(d / "val_images_256" / name, c + 5 * i)
            val.append(f"{name} {c}")
    (d / "info" / "train_filelist_google.txt").write_text("\n".join(train) + "\n")
    (d / "info" / "val_filelist.txt").write_text("\n".join(val) + "\n")
    return {"train": 100, "val": 200}


IMAGENET_PER_CLASS = 2


def write_imagenet_val(root: Path, layout: str = "synset") -> Path:
    """ILSVRC2012's validation images of 52 classes (50 and 51 are not mini-WebVision's),
    ``IMAGENET_PER_CLASS`` each, at <root>/imagenet/val in one of the layouts they are kept in:
    ``synset`` (<wnid>/ILSVRC2012_val_<n>.JPEG), ``index`` (DivideMix's <class>/...) or ``flat``
    as the tar ships (ILSVRC2012_val_<n>.JPEG, image n of class (n - 1) % 52) with the devkit
    beside it: data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line) and
    data/meta.mat, whose IDs are not the synsets' sorted order (ID i is synset (7 i) % 1000,
    as the real devkit's are not) and which also lists non-leaf synsets. Returns the folder."""
    val = root / "imagenet" / "val"
    n_images = 52 * IMAGENET_PER_CLASS
    for n in range(1, n_images + 1):
        c = (n - 1) % 52
        folder = {"synset": val / wnid(c), "index": val / str(c), "flat": val}[layout]
        jpg(folder / f"ILSVRC2012_val_{n:08d}.JPEG", 3 * c + n)
    if layout == "flat":
        id_of = {(7 * i) % 1000: i for i in range(1, 1001)}  # synset index -> ILSVRC2012_ID
        data = root / "imagenet" / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        truth = [str(id_of[(n - 1) % 52]) for n in range(1, n_images + 1)]
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
        write_meta_mat(data / "meta.mat", {i: wnid((7 * i) % 1000) for i in range(1, 1001)})
    return val


def write_meta_mat(path: Path, synsets: dict[int, str]) -> None:
    """The devkit's meta.mat: a struct array ``synsets`` (ILSVRC2012_ID, WNID, words,
    num_children, ...), the leaves (num_children 0) and three ancestors after them."""
    import numpy as np
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "num_children"]
    rows = [(i, w, f"words of {w}", 0) for i, w in synsets.items()]
    rows += [(1001 + k, f"n{9000000 + k:08d}", "an ancestor", 3) for k in range(3)]
    table = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for k, row in enumerate(rows):
        table[k, 0] = row
    savemat(path, {"synsets": table})
