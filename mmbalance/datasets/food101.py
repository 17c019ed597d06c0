"""UPMC Food-101 (101-class image + title classification) in its public or the CGGM JSON layout.

Layouts under ``{root}/{subdir}`` (``layout="auto"`` picks the one present and refuses to guess
when both or neither are):

* ``"public"`` - the UPMC release: ``images/{train,test}/<class>/<file>.jpg`` and
  ``texts/{train,test}_titles.csv``, rows ``(image file name, title, class name)``, no header (a
  first row whose first field is not an image file name is taken as a header and skipped).
* ``"cggm_json"`` - what ``datasets/FOODDataset.py:Food101`` in zrguo/CGGM reads (the MMBT-style
  conversion): ``{train,test}.json`` (optionally ``dev.json``), a list of entries ``{"id",
  "text_tokens": [token, ...], "img_path": path relative to the folder, "label": class name}``.

Items: ``image`` float32 (3, image_size, image_size) in [0, 1] (resized, no mean/std
normalisation, as the CGGM code), ``text`` int64 (max_length,) BERT token ids with ``[CLS]`` /
``[SEP]``, padded with id 0 (the model derives the attention mask as ``text != 0``), ``target``
int64 class index in the official 101-name list (:data:`CLASS_NAMES`, alphabetical).

Text: tokenised once at construction with the BERT WordPiece tokenizer in ``tokenizer_path`` (a
local folder; nothing is downloaded), as the CGGM code does per item (``bert-base-uncased``,
``max_length=50``, padded, truncated; JSON ``text_tokens`` are joined with spaces first). Without
``tokenizer_path`` the loader reads the token cache that ``datasets/food101/prepare.py`` writes
(``bert_tokens_<layout>_<split>.npz``); if neither is available it raises. There is no fallback
vocabulary.

Train augmentation (``augment=True``, train split only), as the CGGM code: horizontal flip,
colour jitter (brightness / contrast / saturation 0.4, hue 0.1) with p 0.8, grayscale with p 0.2,
Gaussian blur with kernel 21 (sigma ~ U(0.1, 2), torchvision's default). It draws from torch's
global RNG, which the runner seeds (and DataLoader workers re-seed).

Splits: the release has train and test only. Validation is ``dev.json`` when the JSON layout has
one, otherwise a seeded ``val_fraction`` of train (:func:`mmbalance.datasets.splits.carve_split`,
``split_seed``; recorded in ``spec.notes``). The CGGM code validates on the test split; here test is
read only for the final test.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.config import ConfigBase
from mmbalance.datasets import register_dataset
from mmbalance.datasets.base import DatasetSpec, MultimodalDataset
from mmbalance.datasets.splits import carve_split, check_fraction, data_dir, require_file
from mmbalance.errors import ConfigError, DataError, ShapeError

__all__ = [
    "Food101",
    "Food101Config",
    "Food101Split",
    "CLASS_NAMES",
    "LAYOUTS",
    "Record",
    "detect_layout",
    "read_records",
    "load_tokenizer",
    "tokenize",
    "token_cache_path",
    "write_token_cache",
    "read_token_cache",
]

# The 101 class names, in the order the CGGM code indexes them (FOODDataset.CLASS_NAME).
CLASS_NAMES: tuple[str, ...] = (
    "apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad", "beignets",
    "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta", "caesar_salad", "cannoli",
    "caprese_salad", "carrot_cake", "ceviche", "cheese_plate", "cheesecake", "chicken_curry",
    "chicken_quesadilla", "chicken_wings", "chocolate_cake", "chocolate_mousse", "churros", "clam_chowder",
    "club_sandwich", "crab_cakes", "creme_brulee", "croque_madame", "cup_cakes", "deviled_eggs", "donuts",
    "dumplings", "edamame", "eggs_benedict", "escargots", "falafel", "filet_mignon", "fish_and_chips",
    "foie_gras", "french_fries", "french_onion_soup", "french_toast", "fried_calamari", "fried_rice",
    "frozen_yogurt", "garlic_bread", "gnocchi", "greek_salad", "grilled_cheese_sandwich", "grilled_salmon",
    "guacamole", "gyoza", "hamburger", "hot_and_sour_soup", "hot_dog", "huevos_rancheros", "hummus",
    "ice_cream", "lasagna", "lobster_bisque", "lobster_roll_sandwich", "macaroni_and_cheese", "macarons",
    "miso_soup", "mussels", "nachos", "omelette", "onion_rings", "oysters", "pad_thai", "paella", "pancakes",
    "panna_cotta", "peking_duck", "pho", "pizza", "pork_chop", "poutine", "prime_rib", "pulled_pork_sandwich",
    "ramen", "ravioli", "red_velvet_cake", "risotto", "samosa", "sashimi", "scallops", "seaweed_salad",
    "shrimp_and_grits", "spaghetti_bolognese", "spaghetti_carbonara", "spring_rolls", "steak",
    "strawberry_shortcake", "sushi", "tacos", "takoyaki", "tiramisu", "tuna_tartare", "waffles",
)
CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}
LAYOUTS = ("auto", "cggm_json", "public")
MISSING_IMAGE_POLICIES = ("error", "drop")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BLUR_KERNEL = 21  # CGGM gaussian_kernel_size
COLOR_DISTORT = 0.5  # CGGM color_distort_strength


@dataclass(frozen=True)
class Food101Config(ConfigBase):
    root: str = ""  # data root (--data-root); files are read from root/subdir
    subdir: str = "food101"  # folder under root; "" reads root itself
    layout: str = "auto"  # "auto" | "cggm_json" ({train,test}.json) | "public" (images/ + texts/*_titles.csv)
    tokenizer_path: str = ""  # local BERT tokenizer folder (vocab.txt); "" = read prepare.py's token cache
    max_length: int = 50  # BERT tokens per title incl. [CLS]/[SEP] (CGGM TEXT_MAX_LENGTH)
    image_size: int = 224  # square resize (ViT-B/16 input)
    augment: bool = True  # CGGM train augmentation (train split only)
    val_fraction: float = 0.1  # part of train carved as validation when there is no dev.json
    split_seed: int = 0  # seed of the validation carve (fixed across runs and seeds)
    on_missing_image: str = "error"  # "error" | "drop" (dropped count recorded in spec.notes)

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 ([CLS] + [SEP]), got {self.max_length!r}")
        if not isinstance(self.image_size, int) or self.image_size < BLUR_KERNEL // 2 + 1:
            raise ValueError(
                f"image_size must be an integer >= {BLUR_KERNEL // 2 + 1} (blur kernel {BLUR_KERNEL}), "
                f"got {self.image_size!r}"
            )
        check_fraction("val_fraction", self.val_fraction)
        if self.split_seed < 0:
            raise ValueError(f"split_seed must be an integer >= 0, got {self.split_seed!r}")
        if self.on_missing_image not in MISSING_IMAGE_POLICIES:
            raise ValueError(
                f"on_missing_image must be one of {MISSING_IMAGE_POLICIES}, got {self.on_missing_image!r}"
            )


@dataclass(frozen=True)
class Record:
    """One sample of a release split: ``key`` is unique (JSON ``id`` or the image's relative path)."""

    key: str
    image: str  # path relative to the dataset folder
    text: str
    label: int


# -- layout and records ----------------------------------------------------------------------------
def detect_layout(folder: Path) -> str:
    """``"cggm_json"`` if ``train.json`` exists, ``"public"`` if ``texts/train_titles.csv`` does.

    Raises:
        ConfigError: both are present (set ``layout``).
        DataError: neither is present (names the files looked for).
    """
    has_json = (folder / "train.json").is_file()
    has_public = (folder / "texts" / "train_titles.csv").is_file()
    if has_json and has_public:
        raise ConfigError(
            f"{folder} holds both train.json (cggm_json layout) and texts/train_titles.csv (public layout); "
            "set layout='cggm_json' or layout='public'"
        )
    if not (has_json or has_public):
        raise DataError(
            f"{folder}: found neither train.json (cggm_json layout) nor texts/train_titles.csv "
            "(public layout); "
            "expected one of the layouts in datasets/food101/README.md"
        )
    return "cggm_json" if has_json else "public"


def _class_index(name: Any, where: str) -> int:
    if not isinstance(name, str) or name not in CLASS_INDEX:
        raise DataError(
            f"{where}: label out of range: class {name!r} is not one of the 101 Food-101 class names "
            f"({CLASS_NAMES[0]!r} ... {CLASS_NAMES[-1]!r})"
        )
    return CLASS_INDEX[name]


def _read_public(folder: Path, split: str) -> list[Record]:
    path = require_file(
        folder / "texts" / f"{split}_titles.csv", "rows (image file name, title, class name), no header"
    )
    records: list[Record] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row_no, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) != 3:
                raise DataError(
                    f"{path} row {row_no}: {len(row)} fields, expected 3 (image file name, title, class name)"
                )
            file, text, label = (f.strip() for f in row)
            if row_no == 1 and not file.lower().endswith(IMAGE_SUFFIXES) and label not in CLASS_INDEX:
                continue  # a header row
            index = _class_index(label, f"{path} row {row_no}")
            rel = f"images/{split}/{label}/{file}"
            records.append(Record(rel, rel, text, index))
    return records


def _read_json(folder: Path, split: str) -> list[Record]:
    path = require_file(folder / f"{split}.json", "a JSON list of {id, text_tokens, img_path, label} entries")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise DataError(f"{path}: top level is {type(entries).__name__}, expected a list of entries")
    records: list[Record] = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: is {type(entry).__name__}, expected an object")
        for key in ("id", "text_tokens", "img_path", "label"):
            if key not in entry:
                raise DataError(
                    f"{where}: missing key {key!r}; expected keys id, text_tokens, img_path, label"
                )
        tokens = entry["text_tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(
                f"{where}: 'text_tokens' is {type(tokens).__name__}, expected a list of token strings"
            )
        label = _class_index(entry["label"], where)
        records.append(Record(str(entry["id"]), str(entry["img_path"]), " ".join(tokens), label))
    return records


def read_records(folder: Path, layout: str, split: str) -> list[Record]:
    """The records of release split ``split`` ("train", "test" or, for JSON, "dev").

    Raises:
        DataError: missing or malformed file, unknown class name, duplicate keys.
    """
    records = _read_public(folder, split) if layout == "public" else _read_json(folder, split)
    seen: set[str] = set()
    for r in records:
        if r.key in seen:
            raise DataError(f"{folder} ({layout}, {split}): duplicate sample {r.key!r}; expected unique ids")
        seen.add(r.key)
    if not records:
        raise DataError(f"{folder} ({layout}, {split}): no samples; expected at least one")
    return records


# -- tokenisation ----------------------------------------------------------------------------------
def load_tokenizer(path: str) -> Any:
    """A ``BertTokenizerFast`` from a local folder (``vocab.txt`` or ``tokenizer.json``); pad id must be 0."""
    from transformers import BertTokenizerFast

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"tokenizer_path {path!r} is not a folder; expected a local BERT tokenizer (vocab.txt)"
        )
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"tokenizer_path {path!r}: cannot load a BERT tokenizer ({exc})") from exc
    if tokenizer.pad_token_id != 0:
        raise ConfigError(
            f"tokenizer_path {path!r}: pad token id is {tokenizer.pad_token_id}, expected 0 "
            "(the model masks ids == 0)"
        )
    return tokenizer


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
    """``(N, max_length)`` int64 ids: special tokens added, padded to ``max_length``, truncated (CGGM)."""
    ids = np.zeros((len(texts), max_length), dtype=np.int64)
    chunk = 4096
    for start in range(0, len(texts), chunk):
        enc = tokenizer(
            texts[start : start + chunk],
            add_special_tokens=True,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="np",
        )
        ids[start : start + chunk] = enc["input_ids"]
    return ids


def token_cache_path(folder: Path, layout: str, split: str) -> Path:
    return folder / f"bert_tokens_{layout}_{split}.npz"


def write_token_cache(folder: Path, layout: str, tokenizer_path: str, max_length: int = 50) -> list[Path]:
    """Tokenise every release split of ``folder`` once and write ``bert_tokens_<layout>_<split>.npz``.

    Each file holds ``keys`` (N,) sample keys, ``ids`` (N, max_length) int32 and ``max_length``.
    """
    if layout == "auto":
        layout = detect_layout(folder)
    tokenizer = load_tokenizer(tokenizer_path)
    has_dev = layout == "cggm_json" and (folder / "dev.json").is_file()
    splits = ["train", "test"] + (["dev"] if has_dev else [])
    written = []
    for split in splits:
        records = read_records(folder, layout, split)
        ids = tokenize(tokenizer, [r.text for r in records], max_length)
        path = token_cache_path(folder, layout, split)
        tmp = path.with_name(path.name + ".tmp.npz")
        keys = np.array([r.key for r in records])
        np.savez(tmp, keys=keys, ids=ids.astype(np.int32), max_length=np.int64(max_length))
        tmp.replace(path)
        written.append(path)
    return written


def read_token_cache(
    folder: Path, layout: str, split: str, records: list[Record], max_length: int
) -> np.ndarray:
    """Ids for ``records`` (in their order) from the token cache.

    Raises:
        DataError: no cache (says how to make one), a cache written for another max_length, or one
            that does not cover every record.
    """
    path = token_cache_path(folder, layout, split)
    if not path.is_file():
        raise DataError(
            f"no tokenizer_path given and no token cache {str(path)!r}; "
            "pass tokenizer_path=<local BERT tokenizer folder> or run: "
            f"python datasets/food101/prepare.py {folder} --tokenizer <folder>"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys, ids, cached_len = npz["keys"], npz["ids"], int(npz["max_length"])
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: not a token cache with keys/ids/max_length ({exc}); re-run prepare.py"
        ) from exc
    if cached_len != max_length or ids.ndim != 2 or ids.shape != (len(keys), max_length):
        raise ShapeError(
            f"{path}: ids {ids.shape} for max_length {cached_len}, expected ({len(keys)}, {max_length}); "
            "re-run prepare.py with this max_length"
        )
    row = {str(k): i for i, k in enumerate(keys)}
    missing = [r.key for r in records if r.key not in row]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of {len(records)} samples are not in the token cache "
            f"(e.g. {missing[0]!r}); "
            "re-run prepare.py"
        )
    return ids[[row[r.key] for r in records]].astype(np.int64)


# -- the dataset -----------------------------------------------------------------------------------
def _transforms(image_size: int, train: bool) -> Any:
    """The CGGM ``val_transform`` / ``train_transform`` (torchvision, imported lazily: it is slow to
    import)."""
    from torchvision import transforms

    if not train:
        return transforms.Compose([transforms.Resize([image_size, image_size]), transforms.ToTensor()])
    jitter = transforms.ColorJitter(
        brightness=0.8 * COLOR_DISTORT, contrast=0.8 * COLOR_DISTORT, saturation=0.8 * COLOR_DISTORT,
        hue=0.2 * COLOR_DISTORT,
    )
    return transforms.Compose(
        [
            transforms.Resize([image_size, image_size]),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([jitter], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.GaussianBlur(kernel_size=BLUR_KERNEL),
            transforms.ToTensor(),
        ]
    )


class Food101Split(Dataset):
    """Items ``{"image": float32 (3, S, S), "text": int64 (L,), "target": int64 ()}``."""

    def __init__(
        self, folder: Path, records: list[Record], ids: np.ndarray, image_size: int, augment: bool
    ) -> None:
        self.folder = folder
        self.images = [r.image for r in records]
        self.ids = torch.from_numpy(ids)
        self.labels = torch.tensor([r.label for r in records], dtype=torch.long)
        self.transform = _transforms(image_size, augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path = self.folder / self.images[index]
        try:
            with Image.open(path) as img:
                image = self.transform(img.convert("RGB"))
        except FileNotFoundError as exc:
            raise DataError(f"missing image file {str(path)!r}") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: cannot be decoded as an image ({exc})") from exc
        return {"image": image, "text": self.ids[index], "target": self.labels[index]}


@register_dataset("food101")
class Food101(MultimodalDataset):
    """UPMC Food-101: image + recipe-page title, 101 classes."""

    Config = Food101Config
    paper = "Wang et al., Recipe recognition with large multimodal food dataset (ICME Workshops 2015)"
    task = "cls"
    modality_names = ("image", "text")
    default_model = "vit_bert"
    default_preset = "food101"

    def __init__(self, config: Food101Config) -> None:
        super().__init__(config)
        folder = data_dir("food101", config.root, config.subdir, "datasets/food101/README.md")
        layout = detect_layout(folder) if config.layout == "auto" else config.layout
        self.folder, self.layout = folder, layout
        tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None

        release = {split: read_records(folder, layout, split) for split in ("train", "test")}
        has_dev = layout == "cggm_json" and (folder / "dev.json").is_file()
        if has_dev:
            release["dev"] = read_records(folder, layout, "dev")
        dropped: dict[str, int] = {}
        for name, records in release.items():
            release[name], dropped[name] = self._check_images(records)
        ids = {
            name: tokenize(tokenizer, [r.text for r in recs], config.max_length)
            if tokenizer is not None
            else read_token_cache(folder, layout, name, recs, config.max_length)
            for name, recs in release.items()
        }
        if has_dev:
            parts = {"train": (release["train"], ids["train"]), "val": (release["dev"], ids["dev"])}
            val_source = "dev.json"
        else:
            carve = carve_split(len(release["train"]), {"val": config.val_fraction}, config.split_seed)
            parts = {
                s: ([release["train"][i] for i in carve[s]], ids["train"][carve[s]]) for s in ("train", "val")
            }
            val_source = (
                f"carved from train: val_fraction={config.val_fraction}, split_seed={config.split_seed}"
            )
        parts["test"] = (release["test"], ids["test"])
        self._parts = parts
        size = config.image_size
        self.spec = DatasetSpec(
            task="cls",
            modalities={"image": (3, size, size), "text": (config.max_length,)},
            num_outputs=len(CLASS_NAMES),
            target_shape=(),
            default_model=self.default_model,
            default_preset=self.default_preset,
            notes={
                "release": "UPMC Food-101",
                "layout": layout,
                "val_split": val_source,
                "val_fraction": None if has_dev else config.val_fraction,
                "split_seed": None if has_dev else config.split_seed,
                "sizes": {s: len(p[0]) for s, p in parts.items()},
                "dropped_missing_images": dropped,
                "text": f"BERT token ids, max_length={config.max_length}, pad id 0 (mask = text != 0)",
                "tokens_from": "tokenizer_path" if tokenizer is not None else "prepare.py token cache",
                "image": f"RGB resized to {size}x{size}, values in [0, 1], no normalisation",
                "augment": bool(config.augment),
            },
        )

    def _check_images(self, records: list[Record]) -> tuple[list[Record], int]:
        missing = [r for r in records if not (self.folder / r.image).is_file()]
        if not missing:
            return records, 0
        if self.config.on_missing_image == "error":
            raise DataError(
                f"missing image file {str(self.folder / missing[0].image)!r} "
                f"({len(missing)} of {len(records)} listed images are missing); expected every listed image, "
                "or set on_missing_image='drop'"
            )
        gone = {r.key for r in missing}
        return [r for r in records if r.key not in gone], len(missing)

    def split(self, split: str) -> Dataset:
        self.check_split_name(split)
        records, ids = self._parts[split]
        augment = self.config.augment and split == "train"
        return Food101Split(self.folder, records, ids, self.config.image_size, augment)
