"""Writers of miniature data sets in the exact on-disk formats of the real ones.

Tests and `benchmarks.pipeline` use them to run the real loaders (the TFDS builders
included) without downloads. Each class's images are noisy variations of one colour,
`class_color(label)`, so a reader can check labels from pixels.

- `write_tiny_imagenet_zip`: `tiny-imagenet-200.zip` as distributed by CS231n.
- `write_cifar_archive`: `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz`, the
  binary version that TFDS's CIFAR builders read.
- `write_image_folder`: a `root/<class>/` tree.

Odd files that occur in real collections are written on request (`ODD_KINDS`): a
grayscale JPEG, a CMYK JPEG, RGBA and palette PNGs, and a PNG and an animated GIF saved
under a `.JPEG` name.
"""

import io
import os
import tarfile
import zipfile
from typing import Optional, Sequence

import numpy as np
import PIL.Image

ODD_KINDS = ("grayscale_jpeg", "cmyk_jpeg", "rgba_png", "palette_png", "png_as_jpeg", "gif_as_jpeg")
# Made-up but well-formed WordNet ids; real Tiny ImageNet ids look the same.
TINY_WNIDS = ("n01443537", "n01629819", "n01641577", "n01644900", "n01698640")


def class_color(label: int) -> np.ndarray:
    """Returns the uint8 RGB `[3]` base colour of a class: far apart for labels 0-9."""
    hues = np.array(
        [[220, 30, 30], [30, 200, 30], [30, 30, 220], [220, 220, 30], [220, 30, 220],
         [30, 220, 220], [240, 140, 20], [120, 60, 20], [240, 240, 240], [90, 90, 90]],
        dtype=np.uint8,
    )
    return hues[label % len(hues)]


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Returns a uint8 `[size, size, 3]` image: the class colour plus uniform noise of +-20."""
    noise = rng.integers(-20, 21, size=(size, size, 3))
    return np.clip(class_color(label).astype(int) + noise, 0, 255).astype(np.uint8)


def encode_image(array: np.ndarray, kind: str = "jpeg") -> bytes:
    """Encodes a uint8 RGB `[h, w, 3]` array as `kind`: "jpeg", "png" or one of `ODD_KINDS`."""
    image = PIL.Image.fromarray(array)
    stream = io.BytesIO()
    if kind == "jpeg":
        image.save(stream, "JPEG", quality=95)
    elif kind == "png":
        image.save(stream, "PNG")
    elif kind == "grayscale_jpeg":
        image.convert("L").save(stream, "JPEG", quality=95)
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(stream, "JPEG", quality=95)
    elif kind == "rgba_png":
        rgba = image.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(stream, "PNG")
    elif kind == "palette_png":
        image.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=64).save(stream, "PNG")
    elif kind == "png_as_jpeg":
        image.save(stream, "PNG")
    elif kind == "gif_as_jpeg":
        second = PIL.Image.fromarray(255 - array)
        image.save(stream, "GIF", save_all=True, append_images=[second], duration=100)
    else:
        raise ValueError(f"Unknown image kind {kind!r}; expected 'jpeg', 'png' or one of {ODD_KINDS}.")
    return stream.getvalue()


def truncated(contents: bytes) -> bytes:
    """Returns the first half of an encoded image, like an interrupted download."""
    return contents[: len(contents) // 2]


def write_tiny_imagenet_zip(
    path: str,
    *,
    num_classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    num_test: int = 2,
    odd_kinds: Sequence[str] = (),
    bad_train_files: Optional[dict] = None,
    extra_val_images: Sequence[str] = (),
    val_annotation_wnids: Optional[dict] = None,
    extra_train_wnids: Sequence[str] = (),
    seed: int = 0,
) -> dict:
    """Writes a miniature `tiny-imagenet-200.zip` in the real layout.

    The real zip has directory entries and these files below `tiny-imagenet-200/`:
    `wnids.txt`, `words.txt` (tab-separated, covering many more ids than wnids.txt),
    `train/<wnid>/<wnid>_boxes.txt`, `train/<wnid>/images/<wnid>_<i>.JPEG`,
    `val/val_annotations.txt` (`file\\twnid\\tx0\\ty0\\tx1\\ty1`), `val/images/val_<i>.JPEG`
    and `test/images/test_<i>.JPEG`.

    Args:
        path: the zip to write.
        num_classes: classes, at most `len(TINY_WNIDS)`.
        train_per_class: train images per class.
        val_per_class: validation images per class.
        num_test: test images (no labels; no split reads them).
        odd_kinds: one extra train image of class 0 for each of these `ODD_KINDS`.
        bad_train_files: file name -> bytes, extra train files of class 0 (e.g. empty or
            truncated).
        extra_val_images: names of validation images written without an annotation line.
        val_annotation_wnids: validation file name -> wnid, to override a label (e.g. a
            wnid missing from wnids.txt).
        extra_train_wnids: train folders written for wnids missing from wnids.txt.
        seed: seed of the pixel noise.

    Returns:
        `{"wnids": [...], "train": {relative path: label}, "validation": {...},
        "odd": {relative path: kind}}`, the paths relative to `tiny-imagenet-200/`.
    """
    rng = np.random.default_rng(seed)
    wnids = list(TINY_WNIDS[:num_classes])
    root = "tiny-imagenet-200/"
    expected = {"wnids": wnids, "train": {}, "validation": {}, "odd": {}}
    val_annotation_wnids = dict(val_annotation_wnids or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        def add(name, data):
            archive.writestr(root + name, data)

        def add_folder(name):
            archive.writestr(zipfile.ZipInfo(root + name.rstrip("/") + "/"), b"")

        add_folder("")
        add("wnids.txt", "".join(f"{wnid}\n" for wnid in wnids))
        words = ["n00001740\tentity", "n00001930\tphysical entity"]
        words += [f"{wnid}\tclass {label} name, synonym {label}" for label, wnid in enumerate(wnids)]
        add("words.txt", "\n".join(words) + "\n")

        for label, wnid in enumerate([*wnids, *extra_train_wnids]):
            add_folder(f"train/{wnid}/images")
            boxes = []
            for index in range(train_per_class):
                name = f"{wnid}_{index}.JPEG"
                add(f"train/{wnid}/images/{name}", encode_image(class_image(label, 64, rng)))
                boxes.append(f"{name}\t0\t0\t63\t63")
                expected["train"][f"train/{wnid}/images/{name}"] = label
            add(f"train/{wnid}/{wnid}_boxes.txt", "\n".join(boxes) + "\n")
        for index, kind in enumerate(odd_kinds):
            name = f"train/{wnids[0]}/images/{wnids[0]}_odd{index}.JPEG"
            add(name, encode_image(class_image(0, 64, rng), kind))
            expected["train"][name] = 0
            expected["odd"][name] = kind
        for name, data in (bad_train_files or {}).items():
            add(f"train/{wnids[0]}/images/{name}", data)

        add_folder("val/images")
        annotations = []
        index = 0
        for label, wnid in enumerate(wnids):
            for _ in range(val_per_class):
                name = f"val_{index}.JPEG"
                add(f"val/images/{name}", encode_image(class_image(label, 64, rng)))
                annotations.append(f"{name}\t{val_annotation_wnids.get(name, wnid)}\t{index % 8}\t2\t60\t61")
                expected["validation"][f"val/images/{name}"] = label
                index += 1
        for name in extra_val_images:
            add(f"val/images/{name}", encode_image(class_image(0, 64, rng)))
        add("val/val_annotations.txt", "\n".join(annotations) + "\n")

        add_folder("test/images")
        for index in range(num_test):
            add(f"test/images/test_{index}.JPEG", encode_image(class_image(0, 64, rng)))
    return expected


CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-bin",
        "archive": "cifar-10-binary.tar.gz",
        "train_files": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test_files": ["test_batch.bin"],
    },
    "cifar100": {
        "folder": "cifar-100-binary",
        "archive": "cifar-100-binary.tar.gz",
        "train_files": ["train.bin"],
        "test_files": ["test.bin"],
    },
}


def _cifar_records(labels: Sequence[int], rng: np.random.Generator, fine_and_coarse: bool) -> tuple[bytes, list]:
    """Returns the binary records of `labels` and the images, uint8 `[32, 32, 3]` each."""
    records, images = [], []
    for label in labels:
        image = class_image(label, 32, rng)
        images.append(image)
        # Each record: label byte(s), then the 1024 red, 1024 green and 1024 blue bytes.
        header = bytes([label % 20, label]) if fine_and_coarse else bytes([label])
        records.append(header + image.transpose(2, 0, 1).tobytes())
    return b"".join(records), images


def write_cifar_archive(folder: str, name: str = "cifar10", *, train_per_file: int = 4, num_test: int = 6, seed: int = 0) -> dict:
    """Writes `cifar-10-binary.tar.gz` or `cifar-100-binary.tar.gz` into `folder`.

    The archive has the real layout: `cifar-10-batches-bin/data_batch_{1..5}.bin`,
    `test_batch.bin` and `batches.meta.txt`, or `cifar-100-binary/train.bin`, `test.bin`,
    `coarse_label_names.txt` and `fine_label_names.txt`. Records are
    `<label byte><3072 image bytes>` (CIFAR-10) or `<coarse byte><fine byte><3072 bytes>`.

    Returns:
        `{"archive": path, "train": (images, labels), "test": (images, labels)}` in
        record order, images uint8 `[n, 32, 32, 3]`.
    """
    layout = CIFAR_LAYOUT[name]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    members = {}
    split_arrays = {}
    for split, files, per_file in (("train", layout["train_files"], train_per_file), ("test", layout["test_files"], num_test)):
        all_images, all_labels = [], []
        for file_index, file_name in enumerate(files):
            labels = [(file_index * per_file + i) % num_classes for i in range(per_file)]
            data, images = _cifar_records(labels, rng, fine_and_coarse=name == "cifar100")
            members[f"{layout['folder']}/{file_name}"] = data
            all_images += images
            all_labels += labels
        split_arrays[split] = (np.stack(all_images), np.asarray(all_labels, np.int64))
    if name == "cifar10":
        members[f"{layout['folder']}/batches.meta.txt"] = "".join(f"class_{i}\n" for i in range(10)).encode() + b"\n"
    else:
        members[f"{layout['folder']}/coarse_label_names.txt"] = "".join(f"super_{i}\n" for i in range(20)).encode()
        members[f"{layout['folder']}/fine_label_names.txt"] = "".join(f"fine_{i}\n" for i in range(100)).encode()
    archive_path = os.path.join(folder, layout["archive"])
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(archive_path, "w:gz") as archive:
        for member_name, data in members.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return {"archive": archive_path, **split_arrays}


def write_image_folder(
    root: str, *, num_classes: int = 3, per_class: int = 5, odd_kinds: Sequence[str] = (), size: int = 24, seed: int = 0
) -> dict:
    """Writes `root/class_<k>/img_<i>.jpg` images, plus one file per odd kind in class 0.

    Returns:
        relative path -> label of every written image.
    """
    rng = np.random.default_rng(seed)
    written = {}
    for label in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{label}"), exist_ok=True)
        for index in range(per_class):
            name = os.path.join(f"class_{label}", f"img_{index}.jpg")
            with open(os.path.join(root, name), "wb") as stream:
                stream.write(encode_image(class_image(label, size, rng)))
            written[name] = label
    for index, kind in enumerate(odd_kinds):
        extension = ".png" if kind.endswith("_png") else ".JPEG"
        name = os.path.join("class_0", f"odd_{kind}{extension}")
        with open(os.path.join(root, name), "wb") as stream:
            stream.write(encode_image(class_image(0, size, rng), kind))
        written[name] = 0
    return written
