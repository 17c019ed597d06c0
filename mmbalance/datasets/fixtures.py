"""Tiny copies of the four paper datasets in their real on-disk formats.

``write_fixtures(root)`` (and ``mmbalance fixtures DIR``) writes, under ``root``::

    food101/        public layout: images/{train,test}/<class>/*.jpg, texts/{train,test}_titles.csv,
                    a tiny BERT WordPiece vocabulary (bert_tokenizer/vocab.txt) and the token
                    cache prepare.py writes (bert_tokens_public_{train,test}.npz)
    food101_cggm/   CGGM JSON layout: {train,test}.json + images/ + token cache
    mosi/           MulT pickle mosi_data.pkl and MMSA pickle aligned_50.pkl
    mosei/          MulT pickle mosei_senti_data.pkl and MMSA pickle aligned_50.pkl
    iemocap/        MMIN layout: A/comparE.h5, A/comparE_mean_std.h5, V/denseface.h5,
                    L/bert_large.h5, target/{1,2}/{trn,val,tst}_{label,int2name}.npy
    brats2021/      NIfTI case folders BraTS2021_0000k/BraTS2021_0000k_{flair,t1ce,t1,t2,seg}.nii.gz
                    (48 x 48 x 16 volumes: run with crop_size <= 48)
    brats2021_h5/   the same cases converted to the h5 layout ({train,valid,test}/<case>.h5)

so ``mmbalance run joint mosi --data-root DIR`` works on them unchanged (BraTS with
``--set crop_size=32``). Feature widths are the real ones (MOSI text 300 / audio 5 / vision 20,
MMSA text 768, IEMOCAP 130 / 342 / 1024); counts and lengths are tiny. Each sample carries a weak
label signal so that a model can fit it, but the fixtures test formats and plumbing, not learning.
Everything is drawn from ``seed`` and written deterministically.
"""

from __future__ import annotations

import argparse
import csv
import json
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from mmbalance.errors import ConfigError, OutputError
from mmbalance.output import output_error, prepare_output

__all__ = ["write_fixtures", "add_fixtures_command", "FIXTURE_NAMES", "BRATS_FIXTURE_SHAPE"]

FIXTURE_NAMES = ("food101", "food101_cggm", "mosi", "mosei", "iemocap", "brats2021", "brats2021_h5")
BRATS_FIXTURE_SHAPE = (48, 48, 16)  # H, W, D of the fixture volumes

_FOOD_CLASSES = ("apple_pie", "pizza", "sushi")
_FOOD_WORDS = {
    "apple_pie": ("apple", "pie", "cinnamon", "crust"),
    "pizza": ("pizza", "cheese", "tomato", "dough"),
    "sushi": ("sushi", "rice", "salmon", "roll"),
}
_FOOD_COMMON = ("best", "easy", "homemade", "recipe", "with", "the", "and", "quick")
_FOOD_COLORS = {"apple_pie": (200, 150, 60), "pizza": (210, 60, 40), "sushi": (235, 235, 225)}


def write_fixtures(root: str | Path, seed: int = 0, names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the fixtures under ``root`` (created if needed); returns name -> dataset folder.

    Args:
        root: parent folder; each fixture goes to ``root/<name>`` (the loaders' default ``subdir``).
        seed: seed of every random draw (the files are a function of it).
        names: a subset of :data:`FIXTURE_NAMES` (default: all). ``brats2021_h5`` is converted
            from ``brats2021``, which is then written too.

    Raises:
        ConfigError: an unknown fixture name.
        OutputError: ``root`` is a file or cannot be written (checked before anything is written).
    """
    wanted = list(FIXTURE_NAMES if names is None else names)
    unknown = [n for n in wanted if n not in FIXTURE_NAMES]
    if unknown:
        raise ConfigError(f"unknown fixture {unknown[0]!r}; expected names from {FIXTURE_NAMES}")
    if "brats2021_h5" in wanted and "brats2021" not in wanted:
        wanted.append("brats2021")
    root = prepare_output(root, option="fixtures DIR")
    writers: dict[str, Callable[[Path, np.random.Generator], Path]] = {
        "food101": _write_food_public,
        "food101_cggm": _write_food_json,
        "mosi": lambda folder, rng: _write_sentiment(folder, rng, "mosi_data.pkl", dims=(300, 5, 20)),
        "mosei": lambda folder, rng: _write_sentiment(
            folder, rng, "mosei_senti_data.pkl", dims=(300, 74, 35)
        ),
        "iemocap": _write_iemocap,
        "brats2021": _write_brats_nifti,
    }
    out: dict[str, Path] = {}
    for i, name in enumerate(FIXTURE_NAMES):
        if name in wanted and name in writers:
            # one generator per fixture, so a subset writes the same files as the full set
            out[name] = writers[name](root / name, np.random.default_rng([seed, i]))
    if "brats2021_h5" in wanted:
        from mmbalance.datasets.brats2021 import BraTS2021Config
        from mmbalance.datasets.brats2021_prepare import convert_nifti_to_h5

        config = BraTS2021Config(root=str(out["brats2021"]), subdir="")
        convert_nifti_to_h5(out["brats2021"], root / "brats2021_h5", config)
        out["brats2021_h5"] = root / "brats2021_h5"
    return {n: out[n] for n in FIXTURE_NAMES if n in out}


def add_fixtures_command(sub: argparse._SubParsersAction) -> None:
    """The ``mmbalance fixtures DIR`` subcommand (registered in ``mmbalance.cli.COMMANDS``)."""

    def run(args: argparse.Namespace) -> int:
        try:
            paths = write_fixtures(args.dir, seed=args.seed, names=args.only)
        except OSError as exc:
            if isinstance(exc, OutputError):
                raise
            raise output_error(exc.filename or args.dir, exc) from exc
        for name, path in paths.items():
            print(f"{name:14s} {path}")
        print(f"use: mmbalance run joint mosi --data-root {args.dir}  (BraTS: --set crop_size=32)")
        return 0

    p = sub.add_parser(
        "fixtures",
        help="write tiny copies of the paper datasets in their on-disk formats",
        description="Write tiny copies of UPMC Food-101, CMU-MOSI/MOSEI, IEMOCAP and BraTS 2021 in their "
        "real on-disk formats under DIR (one folder per dataset), for trying the pipeline without the data.",
    )
    p.add_argument("dir", metavar="DIR", help="output folder (pass it as --data-root)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random contents (default: %(default)s)")
    p.add_argument(
        "--only", nargs="+", metavar="NAME", choices=FIXTURE_NAMES, help="write only these fixtures"
    )
    p.set_defaults(func=run)


# -- Food-101 ------------------------------------------------------------------------------------
def _write_vocab(folder: Path) -> Path:
    words = sorted({w for ws in _FOOD_WORDS.values() for w in ws} | set(_FOOD_COMMON))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s"]
    tok_dir = folder / "bert_tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return tok_dir


def _food_title(rng: np.random.Generator, cls: str) -> list[str]:
    words = list(rng.choice(_FOOD_WORDS[cls], size=2, replace=False)) + list(rng.choice(_FOOD_COMMON, size=2))
    if rng.random() < 0.3:
        words.append("Recipe!")  # punctuation and case, handled by the BERT tokenizer
    rng.shuffle(words)
    return [str(w) for w in words]


def _write_jpg(path: Path, rng: np.random.Generator, cls: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = int(rng.integers(28, 48)), int(rng.integers(28, 48))  # varied sizes: the loader resizes
    base = np.array(_FOOD_COLORS[cls], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=90)


def _food_samples(
    rng: np.random.Generator, per_class: dict[str, int]
) -> dict[str, list[tuple[str, str, list[str]]]]:
    """split -> [(class, file name, title tokens)]."""
    out: dict[str, list[tuple[str, str, list[str]]]] = {}
    for split, n in per_class.items():
        out[split] = [
            (cls, f"{cls}_{split}_{i}.jpg", _food_title(rng, cls)) for cls in _FOOD_CLASSES for i in range(n)
        ]
    return out


def _write_food_public(folder: Path, rng: np.random.Generator) -> Path:
    from mmbalance.datasets.food101 import write_token_cache

    samples = _food_samples(rng, {"train": 6, "test": 2})
    (folder / "texts").mkdir(parents=True, exist_ok=True)
    for split, rows in samples.items():
        with open(folder / "texts" / f"{split}_titles.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            for cls, file, tokens in rows:
                _write_jpg(folder / "images" / split / cls / file, rng, cls)
                writer.writerow([file, " ".join(tokens) + ", a title with a comma", cls])
    write_token_cache(folder, "public", str(_write_vocab(folder)), max_length=50)
    return folder


def _write_food_json(folder: Path, rng: np.random.Generator) -> Path:
    from mmbalance.datasets.food101 import write_token_cache

    samples = _food_samples(rng, {"train": 6, "test": 2})
    for split, rows in samples.items():
        entries = []
        for i, (cls, file, tokens) in enumerate(rows):
            rel = f"images/{split}/{cls}/{file}"
            _write_jpg(folder / rel, rng, cls)
            entries.append({"id": f"{split}_{i}", "text_tokens": tokens, "img_path": rel, "label": cls})
        (folder / f"{split}.json").write_text(json.dumps(entries), encoding="utf-8")
    write_token_cache(folder, "cggm_json", str(_write_vocab(folder)), max_length=50)
    return folder


# -- MOSI / MOSEI --------------------------------------------------------------------------------
def _sentiment_split(
    rng: np.random.Generator, n: int, length: int, dims: tuple[int, int, int]
) -> dict[str, np.ndarray]:
    labels = np.round(rng.uniform(-3, 3, size=n), 1).astype(np.float32)
    labels[0] = 0.0  # neutral samples exist in the release (Acc-2 has-0 / non-0)
    d_t, d_a, d_v = dims
    direction = rng.normal(size=d_t).astype(np.float32) / np.sqrt(d_t)
    text = (rng.normal(size=(n, length, d_t)) * 0.5 + labels[:, None, None] * direction).astype(np.float32)
    audio = rng.normal(size=(n, length, d_a)).astype(np.float32)
    audio[0, :2, 0] = -np.inf  # the MOSI release has -inf in audio; loaders set it to 0
    vision = rng.normal(size=(n, length, d_v)).astype(np.float32)
    return {"text": text, "audio": audio, "vision": vision, "labels": labels}


def _write_sentiment(
    folder: Path, rng: np.random.Generator, mult_file: str, dims: tuple[int, int, int]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 16, "valid": 8, "test": 8}
    mult = {}
    for split, n in sizes.items():
        part = _sentiment_split(rng, n, 12, dims)
        mult[split] = {**part, "labels": part["labels"].reshape(n, 1, 1)}
    with open(folder / mult_file, "wb") as fh:
        pickle.dump(mult, fh, protocol=4)
    mmsa = {}
    for split, n in sizes.items():
        part = _sentiment_split(rng, n, 10, (768, dims[1], dims[2]))
        mmsa[split] = {
            "raw_text": np.array([f"utterance {i}" for i in range(n)], dtype=object),
            "id": np.array([f"clip_{split}_{i}" for i in range(n)], dtype=object),
            "text": part["text"],
            "text_bert": rng.integers(0, 100, size=(n, 3, 10)).astype(np.float32),
            "audio": part["audio"],
            "vision": part["vision"],
            "audio_lengths": np.full(n, 10),
            "vision_lengths": np.full(n, 10),
            "classification_labels": (part["labels"] > 0).astype(np.float32),
            "regression_labels": part["labels"],
        }
    with open(folder / "aligned_50.pkl", "wb") as fh:
        pickle.dump(mmsa, fh, protocol=4)
    return folder


# -- IEMOCAP --------------------------------------------------------------------------------------
def _write_iemocap(folder: Path, rng: np.random.Generator) -> Path:
    dims = {"A": 130, "V": 342, "L": 1024}
    lengths = {"A": (20, 80), "V": (5, 50), "L": (3, 22)}
    files = {"A": "comparE", "V": "denseface", "L": "bert_large"}
    n_utt, n_cls = 32, 4
    names = [
        f"Ses0{1 + i % 5}{'FM'[i % 2]}_impro0{i % 7 + 1}_{'FM'[(i + 1) % 2]}{i:03d}" for i in range(n_utt)
    ]
    classes = np.arange(n_utt) % n_cls
    for sub in dims:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / sub / f"{files[sub]}.h5", "w") as fh:
            for name, cls in zip(names, classes, strict=True):
                length = int(rng.integers(*lengths[sub], endpoint=True))
                feat = rng.normal(size=(length, dims[sub])).astype(np.float32)
                feat[:, cls] += 2.0  # a weak class signal
                if sub == "A":
                    feat = feat * 3.0 + 5.0  # raw ComParE scale; the mean/std file normalises it
                fh[name] = feat
    folds = {1: np.arange(n_utt), 2: np.roll(np.arange(n_utt), 8)}
    with h5py.File(folder / "A" / "comparE_mean_std.h5", "w") as fh:
        for fold in folds:
            group = fh.create_group(str(fold))
            group["mean"] = np.full(dims["A"], 5.0, dtype=np.float32)
            group["std"] = np.full(dims["A"], 3.0, dtype=np.float32)
    for fold, order in folds.items():
        target = folder / "target" / str(fold)
        target.mkdir(parents=True, exist_ok=True)
        parts = {"trn": order[:16], "val": order[16:24], "tst": order[24:]}
        for tag, idx in parts.items():
            onehot = np.eye(n_cls, dtype=np.float32)[classes[idx]]
            np.save(target / f"{tag}_label.npy", onehot)
            np.save(target / f"{tag}_int2name.npy", np.array([[names[i].encode()] for i in idx]))
    return folder


# -- BraTS 2021 -----------------------------------------------------------------------------------
def _write_brats_nifti(folder: Path, rng: np.random.Generator, n_cases: int = 10) -> Path:
    import nibabel as nib

    h, w, d = BRATS_FIXTURE_SHAPE
    yy, xx, zz = np.meshgrid(np.arange(h), np.arange(w), np.arange(d), indexing="ij")
    brain = (
        ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 + ((zz - d / 2) / (0.55 * d)) ** 2
        <= 1
    )
    for k in range(n_cases):
        case = f"BraTS2021_{k:05d}"
        cy, cx, cz = h / 2 + rng.uniform(-5, 5), w / 2 + rng.uniform(-5, 5), d / 2 + rng.uniform(-2, 2)
        r = ((yy - cy) / 9.0) ** 2 + ((xx - cx) / 8.0) ** 2 + ((zz - cz) / 4.0) ** 2
        seg = np.zeros((h, w, d), dtype=np.uint8)
        seg[r <= 1.0] = 2  # edema
        seg[r <= 0.45] = 4  # enhancing ring
        seg[r <= 0.15] = 1  # necrotic core
        base = {"flair": (300, {2: 250, 4: 200, 1: 150}), "t1ce": (250, {2: 20, 4: 400, 1: -120}),
                "t1": (280, {2: -30, 4: 10, 1: -60}), "t2": (320, {2: 200, 4: 150, 1: 250})}
        (folder / case).mkdir(parents=True, exist_ok=True)
        affine = np.eye(4)
        for m, (level, shifts) in base.items():
            vol = np.where(brain, level + rng.normal(0, 20, size=(h, w, d)), 0.0)
            for lab, shift in shifts.items():
                vol[(seg == lab) & brain] += shift
            img = nib.Nifti1Image(np.clip(vol, 0, None).astype(np.int16), affine)
            nib.save(img, str(folder / case / f"{case}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(folder / case / f"{case}_seg.nii.gz"))
    return folder
