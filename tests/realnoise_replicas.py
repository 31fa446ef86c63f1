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


def write_mini_webvision(root: Path) -> dict[str, int]:
    """<root>/webvision/info/{train_filelist_google.txt,val_filelist.txt} over 52 classes (the
    lines of classes 50 and 51 are not mini-WebVision's); google/q<class>/<name>.jpg and
    val_images_256/<name>.jpg. Per class: 2 training images, 4 validation images."""
    d = root / "webvision"
    (d / "info").mkdir(parents=True)
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
