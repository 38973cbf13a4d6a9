"""Datasets: the registry of sources, the seeded split, train-only normalisation, and prepared folders.

A prepared dataset is a folder with arrays.npz (train/val/test splits, already normalised) and meta.json.
Everything is generated or read locally: nothing is downloaded, ever.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.base import StrictModel
from models.registry import DataShape
from pipeline.io import atomic_write_bytes, atomic_write_json, replace_dir
from pipeline.specs.datasets import (CorpusLabelsSource, CorpusSource, DiabetesSource, DigitsSource, IdxSource,
                                     MemorySource, Mnist1dSource, NormaliseName, NpzSource, SequenceSource, SplitSpec,
                                     TableSource)
from pipeline.specs.errors import UserError, from_validation_error, refuse_unless_ours

PREPARED_KIND = "prepared dataset"  # the kind of folder replace_dir marks (pipeline/io.py)

TargetKind = Literal["class", "value", "tokens"]


# ── raw data, as a source hands it over ──────────────────────────────────────
@dataclass
class RawData:
    x: np.ndarray
    y: np.ndarray
    target: TargetKind
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int | None = None
    classes: list[str] | None = None  # names, for reports
    extra_meta: dict | None = None  # source-specific facts (vocabulary, ...) copied into meta.json


def _load_digits(spec: DigitsSource) -> RawData:
    from sklearn.datasets import load_digits
    d = load_digits()
    return RawData(x=d.images.astype(np.float32)[:, None], y=d.target.astype(np.int64), target="class",
                   num_classes=10, classes=[str(i) for i in range(10)])


def _load_mnist1d(spec: Mnist1dSource) -> RawData:
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())  # generates locally; get_dataset() would try a download
    return RawData(x=d["x"].astype(np.float32), y=d["y"].astype(np.int64), x_test=d["x_test"].astype(np.float32),
                   y_test=d["y_test"].astype(np.int64), target="class", num_classes=10,
                   classes=[str(i) for i in range(10)])


def _load_diabetes(spec: DiabetesSource) -> RawData:
    from sklearn.datasets import load_diabetes
    d = load_diabetes()
    return RawData(x=d.data.astype(np.float32), y=d.target.astype(np.float32)[:, None], target="value")


def _numeric(a: np.ndarray, where: str, field: str, what: str) -> None:
    """Text, objects or dates where numbers belong are the user's to fix, said plainly (not a numpy traceback)."""
    if a.dtype.kind not in "biuf":
        raise UserError(where, f"{what} must be numbers, but they are {a.dtype} values", field=field)
    if a.size == 0:
        raise UserError(where, f"{what} are empty (no samples)", field=field)


def _labels_or_values(y: np.ndarray, target: str, where: str, num_classes: int | None = None) -> tuple[np.ndarray, str, int | None]:
    _numeric(y, where, "y", "labels or targets")
    is_int = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    kind = target if target != "auto" else ("class" if is_int else "value")
    if kind == "value":
        y = y.astype(np.float32)
        return (y[:, None] if y.ndim == 1 else y), "value", None
    if not is_int:
        if not np.isfinite(y).all():
            raise UserError(where, f"class labels must be integers, found {int((~np.isfinite(y)).sum())} NaN or Inf",
                            field="y")
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise UserError(where, "class labels must be integers", field="y")
    y = y.astype(np.int64).reshape(-1)
    if y.min() < 0:
        raise UserError(where, f"class labels must be >= 0, found {y.min()}", field="y")
    k = num_classes or int(y.max()) + 1
    if y.max() >= k:
        raise UserError(where, f"label {y.max()} is out of range for num_classes={k}", field="y")
    return y, "class", k


def _load_npz(spec: NpzSource) -> RawData:
    path = spec.path
    if not path.is_file():
        raise UserError(path, "data file not found", field="path")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(path, f"cannot read as .npz: {exc}") from None
    if not hasattr(arrays, "files"):
        raise UserError(path, "a single .npy array, not an .npz archive of x and y")
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(path, f"missing array {key!r} (found: {', '.join(arrays.files) or 'none'})", field=key)
    has_test = "x_test" in arrays
    if has_test != ("y_test" in arrays):
        raise UserError(path, "x_test and y_test must come together", field="x_test")
    x, y = _npz_member(arrays, "x", path), _npz_member(arrays, "y", path)
    x_test, y_test = (_npz_member(arrays, "x_test", path), _npz_member(arrays, "y_test", path)) if has_test else (None, None)
    for key, a in (("x", x), ("x_test", x_test)):
        if a is not None:
            _numeric(a, str(path), key, "features")
    y, kind, k = _labels_or_values(y, spec.target, str(path), spec.num_classes)
    if has_test:
        y_test, _, _ = _labels_or_values(y_test, kind, str(path), k)
    return RawData(x=x.astype(np.float32), y=y, x_test=None if x_test is None else x_test.astype(np.float32),
                   y_test=y_test, target=kind, num_classes=k)


def _npz_member(arrays, key: str, path: Path) -> np.ndarray:
    """One array of an .npz; a corrupt member or an object array (which would need pickle) is the user's."""
    try:
        return arrays[key]
    except Exception as exc:  # noqa: BLE001 - zlib, zipfile, numpy format errors: all mean a bad file
        raise UserError(path, f"cannot read array {key!r}: {type(exc).__name__}: {exc}", field=key) from None


def _load_table(spec: TableSource) -> RawData:
    import pandas as pd
    path = spec.path
    if not path.is_file():
        raise UserError(path, "data file not found", field="path")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(path, f"cannot read the table: {exc}") from None
    if spec.target_column not in frame.columns:
        raise UserError(path, f"no column {spec.target_column!r}; columns are: {', '.join(map(str, frame.columns))}",
                        field="target_column")
    features = frame.drop(columns=[spec.target_column])
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise UserError(path, f"feature columns must be numeric: {', '.join(map(str, non_numeric))}")
    target = frame[spec.target_column]
    classes = None
    if spec.target != "value" and not pd.api.types.is_numeric_dtype(target):
        codes, uniques = pd.factorize(target, sort=True)
        y, classes = codes.astype(np.int64), [str(u) for u in uniques]
        kind, k = "class", len(uniques)
    else:
        y, kind, k = _labels_or_values(target.to_numpy(), spec.target, str(path))
    return RawData(x=features.to_numpy(np.float32), y=y, target=kind, num_classes=k, classes=classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(path, f"cannot read: {exc}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(path, "not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise UserError(path, f"truncated IDX header: {ndim} dimensions need {4 + 4 * ndim} bytes, the file has "
                        f"{len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(path, f"IDX header says {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(folder, f"missing IDX file {stem}[.gz]", field="path")


def _load_idx(spec: IdxSource) -> RawData:
    folder = spec.path
    if not folder.is_dir():
        raise UserError(folder, "folder not found", field="path")
    arrays = {s: _read_idx(_find_idx(folder, s)) for s in
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    x, y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    xt, yt = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    if len(x) != len(y) or len(xt) != len(yt):
        raise UserError(folder, "image and label files hold different numbers of samples")
    k = int(max(y.max(), yt.max())) + 1
    return RawData(x=x.astype(np.float32)[:, None], y=y.astype(np.int64), x_test=xt.astype(np.float32)[:, None],
                   y_test=yt.astype(np.int64), target="class", num_classes=k)


def _load_sequence(spec: SequenceSource) -> RawData:
    from pipeline.data.synthetic import addition_sequences, symbol_sequences
    if spec.task == "add":
        data = addition_sequences(spec.symbols, spec.min_len, spec.max_len, spec.samples, spec.seed)
    else:
        data = symbol_sequences(spec.task, spec.symbols, spec.min_len, spec.max_len, spec.samples, spec.seed)
    return RawData(x=data.source, y=data.target, target="tokens", extra_meta={
        "vocab_size": len(data.itos), "max_len": data.source.shape[1], "target_len": data.target.shape[1],
        "itos": data.itos, "sequence_task": spec.task})


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(path, "text file not found", field="path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(path, f"not UTF-8 text (byte {exc.start}): {exc.reason}", field="path") from None


def _load_corpus(spec: CorpusSource) -> RawData:
    """Chunks of `context` characters: x = text[i:i+T], y = text[i+1:i+T+1] (the next character at every step)."""
    from pipeline.data.synthetic import generate_corpus, grammar_entropy
    text = _read_text(spec.path) if spec.path else generate_corpus(spec.characters, spec.seed)
    t = spec.context
    chunks = (len(text) - 1) // t
    if chunks < 20:
        raise UserError(spec.path or "corpus", f"the text has {len(text)} characters: too short for 20 chunks of "
                        f"context {t}", field="path" if spec.path else "characters")
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    ids = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
    starts = np.arange(chunks) * t
    windows = ids[starts[:, None] + np.arange(t + 1)[None, :]]  # (chunks, T + 1)
    # The test set is the tail of the text (unseen contiguous text, as with a user's file), never mixed in.
    n_test = max(1, int(round(chunks * spec.split.test_fraction)))
    x, y = windows[:, :-1], windows[:, 1:]
    extra = {"vocab_size": len(itos), "max_len": t, "itos": itos, "characters": len(text),
             "corpus": str(spec.path) if spec.path else "grammar"}
    if spec.path is None:
        extra["entropy"] = grammar_entropy()  # bits per character: the floor any model's test bpc can reach
    return RawData(x=x[:-n_test], y=y[:-n_test], x_test=x[-n_test:], y_test=y[-n_test:], target="tokens",
                   extra_meta=extra)


def _load_memory(spec: MemorySource) -> RawData:
    from pipeline.data.synthetic import memory_sequences
    x, y = memory_sequences(spec.symbols, spec.gap, spec.samples, spec.seed)
    return RawData(x=x, y=y, target="class", num_classes=spec.symbols, classes=[str(i) for i in range(spec.symbols)],
                   extra_meta={"chance_accuracy": 1.0 / spec.symbols})


def _load_corpus_labels(spec: CorpusLabelsSource) -> RawData:
    """Token inputs (N, context) with class labels: the first sentence's main verb class (synthetic.py)."""
    from pipeline.data.synthetic import MAIN_VERB_CLASSES, grammar_alphabet, main_verb_chunks
    texts, labels = main_verb_chunks(spec.samples, spec.context, spec.seed)
    itos = grammar_alphabet()  # the generated corpus's numbering, whatever characters these texts happen to use
    stoi = {c: i for i, c in enumerate(itos)}
    x = np.array([[stoi[c] for c in text] for text in texts], dtype=np.int64)
    return RawData(x=x, y=labels, target="class", num_classes=len(MAIN_VERB_CLASSES), classes=MAIN_VERB_CLASSES,
                   extra_meta={"vocab_size": len(itos), "max_len": spec.context, "itos": itos, "corpus": "grammar"})


# One loader per source; a new source is a spec class above plus one entry here.
LOADERS: dict[str, Callable[[StrictModel], RawData]] = {
    "digits": _load_digits, "mnist1d": _load_mnist1d, "diabetes": _load_diabetes,
    "npz": _load_npz, "table": _load_table, "idx": _load_idx,
    "sequence": _load_sequence, "corpus": _load_corpus, "memory": _load_memory,
    "corpus_labels": _load_corpus_labels,
}


# ── checks, split, normalisation ─────────────────────────────────────────────
def _check(raw: RawData, where: str) -> None:
    for name, x, y in (("x", raw.x, raw.y), ("x_test", raw.x_test, raw.y_test)):
        if x is None:
            continue
        if x.ndim not in (2, 3, 4):
            raise UserError(where, f"{name} must have shape (N,F), (N,L), (N,C,L) or (N,C,H,W); got {x.shape}",
                            field=name)
        if len(x) != len(y):
            raise UserError(where, f"{name} has {len(x)} samples but its labels have {len(y)}", field=name)
        if raw.target != "tokens" and not np.isfinite(x).all():
            raise UserError(where, f"{name} contains NaN or Inf values ({int((~np.isfinite(x)).sum())} of them)",
                            field=name)
        if raw.target == "value" and not np.isfinite(y).all():
            raise UserError(where, "the target contains NaN or Inf values", field="y")
    if raw.x_test is not None and raw.x_test.shape[1:] != raw.x.shape[1:]:
        raise UserError(where, f"x_test samples have shape {raw.x_test.shape[1:]} but x samples {raw.x.shape[1:]}",
                        field="x_test")
    if len(raw.x) < 10:
        raise UserError(where, f"only {len(raw.x)} samples; need at least 10 to split", field="x")


def _split(n: int, y: np.ndarray, fraction: float | int, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split
    idx = np.arange(n)
    strat = y if stratify and np.bincount(y).min() >= 2 else None
    a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    return np.sort(a), np.sort(b)


def _norm_axes(x: np.ndarray, how: NormaliseName) -> tuple[int, ...]:
    """The axes of the training inputs (N, ...) that one statistic is taken over.

    auto: (N, F) tables and (N, L) signals get one per feature or position (axis 0 only); (N, C, L) signals
    and (N, C, H, W) images one per channel (keeps spatial structure). channel: axis 1 is the channel, and a
    2-D input is one channel. feature: one per input element. global: one over everything.
    """
    if how == "auto":
        how = "feature" if x.ndim == 2 else "channel"
    if how == "feature":
        return (0,)
    if how == "channel" and x.ndim > 2:
        return tuple(i for i in range(x.ndim) if i != 1)
    return tuple(range(x.ndim))  # global, or channel of a one-channel input


def split_and_normalise(raw: RawData, split: SplitSpec) -> tuple[dict[str, np.ndarray], dict]:
    stratify = raw.target == "class"
    if raw.x_test is None:
        rest, test = _split(len(raw.x), raw.y, split.test_fraction, split.seed, stratify)
        x_test, y_test = raw.x[test], raw.y[test]
        x, y = raw.x[rest], raw.y[rest]
    else:
        x, y, x_test, y_test = raw.x, raw.y, raw.x_test, raw.y_test
    if split.validates:
        train, val = _split(len(x), y, split.val_fraction, split.seed, stratify)
    else:  # no validation split: every non-test example trains, and val_x, val_y hold none (shape (0, ...))
        train, val = np.arange(len(x)), np.arange(0)
    arrays = {"train_x": x[train], "train_y": y[train], "val_x": x[val], "val_y": y[val],
              "test_x": x_test, "test_y": y_test}
    stats: dict = {}
    tokens_in = raw.target == "tokens" or (raw.extra_meta or {}).get("vocab_size") is not None  # labelled text too
    if not tokens_in and split.normalise != "none":  # token ids are categorical; never rescale them
        axes = _norm_axes(arrays["train_x"], split.normalise)
        mean = arrays["train_x"].mean(axis=axes, keepdims=True)
        std = arrays["train_x"].std(axis=axes, keepdims=True) + 1e-6
        for part in ("train", "val", "test"):
            arrays[f"{part}_x"] = ((arrays[f"{part}_x"] - mean) / std).astype(np.float32)
        stats["x_mean"], stats["x_std"] = mean.reshape(-1).tolist(), std.reshape(-1).tolist()
    if raw.target == "value":  # regress in standard units; evaluate reports original units
        y_mean, y_std = arrays["train_y"].mean(0), arrays["train_y"].std(0) + 1e-6
        for part in ("train", "val", "test"):
            arrays[f"{part}_y"] = ((arrays[f"{part}_y"] - y_mean) / y_std).astype(np.float32)
        stats["y_mean"], stats["y_std"] = y_mean.tolist(), y_std.tolist()
    return arrays, stats


# ── the prepared dataset ─────────────────────────────────────────────────────
META_FILE = "meta.json"


class DataMeta(BaseModel):
    """meta.json of a prepared dataset: the one place its keys are named, written and read through it.

    Keys come out in this order (the file's order), each only where it was set: a folder prepared before a key
    existed still reads, and a file is written with the content it always had. A source's own facts come last;
    `prepared_dir` and `split_seed` live in memory only and are never written.
    """

    model_config = ConfigDict(extra="allow", title="meta.json")
    name: str = Field(description="The dataset's name.")
    source: str | None = Field(default=None, description="The source it was prepared from (digits, npz, ...).")
    spec: dict[str, Any] | None = Field(default=None, description="The dataset spec it was prepared from.")
    target: TargetKind | None = Field(default=None, description="What the targets are.")
    input_shape: list[int] = Field(description="One example's shape.")
    target_shape: list[int] | None = Field(default=None, description="One target's shape.")
    output_size: int = Field(description="Classes, values or vocabulary size a model outputs.")
    num_classes: int | None = Field(default=None, description="Number of classes (class targets).")
    classes: list[str] | None = Field(default=None, description="Class names, for reports.")
    sizes: dict[str, int] | None = Field(default=None, description="Examples per split (train, val, test).")
    normalisation: dict[str, Any] | None = Field(default=None, description="Train-split statistics applied.")
    content_hash: str | None = Field(default=None, description="Hash of the arrays.")
    value_range: list[float] | None = Field(default=None, description="Smallest and largest training input.")
    vocab_size: int | None = Field(default=None, description="Token vocabulary size (token data).")
    max_len: int | None = Field(default=None, description="Input sequence length (token data).")
    target_len: int | None = Field(default=None, description="Target sequence length (token pairs).")
    itos: list[str] | None = Field(default=None, description="Token index → text (token data).")
    sequence_task: str | None = Field(default=None, description="The synthetic sequence task (sequence data).")
    characters: int | None = Field(default=None, description="Characters in the text (corpus data).")
    corpus: str | None = Field(default=None, description="The text file, or 'grammar' (corpus data).")
    entropy: dict[str, Any] | None = Field(default=None, description="The generating grammar's entropy: the "
                                                                      "floor of any model's bits per character.")
    chance_accuracy: float | None = Field(default=None, description="The accuracy of a model that ignores its "
                                          "inputs, where the generator fixes it (memory data: 1/symbols, the "
                                          "labels being uniform).")
    prepared_dir: str | None = Field(default=None, exclude=True, description="In memory only: the folder it was "
                                     "loaded from, beside which tasks keep artifacts (the feature classifier).")
    split_seed: int | None = Field(default=None, exclude=True, description="In memory only: the seed that "
                                   "re-drew the train/validation split (vary: split).")

    def as_dict(self) -> dict:
        """The content of meta.json."""
        return self.model_dump(exclude_unset=True)


def data_meta(content: dict, source: str | Path) -> DataMeta:
    """meta.json's content as its record; content that does not fit is a UserError naming `source` and the key."""
    try:
        return DataMeta.model_validate(content)
    except ValidationError as err:
        raise from_validation_error(source, err) from None


def write_meta(folder: Path, meta: DataMeta) -> None:
    atomic_write_json(folder / META_FILE, meta.as_dict())


@dataclass
class Prepared:
    """A prepared dataset in memory: meta plus the six split arrays as tensors."""

    meta: DataMeta
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):  # built in memory (tests, benches): checked into the record here
            self.meta = DataMeta.model_validate(self.meta)

    @property
    def shape(self) -> DataShape:
        return shape_from_meta(self.meta)


def shape_from_meta(meta: DataMeta) -> DataShape:
    return DataShape(input_shape=tuple(meta.input_shape), output_size=meta.output_size, vocab_size=meta.vocab_size,
                     max_len=meta.max_len, target_len=meta.target_len, target=meta.target,
                     value_range=tuple(meta.value_range) if meta.value_range else None)


def build_arrays(name: str, spec: StrictModel) -> tuple[dict[str, np.ndarray], DataMeta]:
    """Load a source, check it, split and normalise it: everything but writing."""
    raw = LOADERS[spec.source](spec)
    where = str(getattr(spec, "path", None) or name)
    _check(raw, where)
    arrays, stats = split_and_normalise(raw, spec.split)
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    y_shape = list(arrays["train_y"].shape[1:])
    meta = {
        "name": name,
        "source": spec.source,
        "spec": spec.model_dump(mode="json"),
        "target": raw.target,
        "input_shape": list(arrays["train_x"].shape[1:]),
        "target_shape": y_shape,
        "output_size": raw.num_classes if raw.target == "class" else (y_shape[0] if y_shape else 1),
        "num_classes": raw.num_classes,
        "classes": raw.classes,
        "sizes": {part: int(len(arrays[f"{part}_x"])) for part in ("train", "val", "test")},
        "normalisation": stats,
        "content_hash": digest.hexdigest()[:16],
        **(raw.extra_meta or {}),
    }
    if raw.target == "tokens":
        meta["output_size"] = meta["vocab_size"]
    else:  # what a generator's bounded output layer spans (models/gan.py)
        meta["value_range"] = [float(arrays["train_x"].min()), float(arrays["train_x"].max())]
    return arrays, data_meta(meta, where)  # checked here: a builder's slip never reaches meta.json


def prepare(name: str, spec: StrictModel, out_dir: str | Path) -> DataMeta:
    """Write a prepared dataset folder atomically: a failure leaves no half-written folder behind."""
    refuse_unless_ours(out_dir, PREPARED_KIND)  # before the work of building: a refusal costs nothing
    arrays, meta = build_arrays(name, spec)
    write_prepared(arrays, meta, out_dir)
    return meta


def write_prepared(arrays: dict[str, np.ndarray], meta: dict | DataMeta, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    refuse_unless_ours(out_dir, PREPARED_KIND)
    meta = meta if isinstance(meta, DataMeta) else data_meta(meta, out_dir / META_FILE)

    def fill(tmp: Path) -> None:
        buffer = _npz_bytes(arrays)
        atomic_write_bytes(tmp / "arrays.npz", buffer)
        write_meta(tmp, meta)

    replace_dir(out_dir, fill, kind=PREPARED_KIND)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def has_validation(meta: DataMeta) -> bool:
    """Whether the data holds a validation split: a dataset declared with `split: {val_fraction: 0}` holds none
    (a folder prepared before sizes were recorded always had one)."""
    return (meta.sizes or {}).get("val", 1) > 0


SPLIT_TITLES = {"train": "training", "val": "validation", "test": "test"}  # split key → its name in a caption


def shown_split(data: Prepared) -> str:
    """The split whose examples a run shows or times each epoch (sample grids, prompts, latency): validation,
    or training where there is no validation split."""
    return "val" if has_validation(data.meta) else "train"


def redraw_split(data: Prepared, seed: int) -> Prepared:
    """Train and validation pooled and split again with `seed`, at the same sizes (stratified by class where
    the prepared split was); the test split is left alone. Normalisation keeps the prepared split's statistics.
    Data without a validation split has nothing to re-draw (the engine refuses a split seed for it first)."""
    if not has_validation(data.meta):
        raise UserError(data.meta.prepared_dir or data.meta.name, "has no validation split to re-draw (its "
                        "split.val_fraction is 0)", field="data.split_seed")
    t = data.tensors
    x, y = torch.cat([t["train_x"], t["val_x"]]), torch.cat([t["train_y"], t["val_y"]])
    labels = y.numpy() if data.meta.target == "class" else np.zeros(len(y), dtype=np.int64)
    train, val = _split(len(x), labels, len(t["val_x"]), seed, data.meta.target == "class")
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    tensors = {**t, "train_x": x[train], "train_y": y[train], "val_x": x[val], "val_y": y[val]}
    return Prepared(meta=data.meta.model_copy(update={"split_seed": seed}), tensors=tensors)


def read_meta(folder: str | Path) -> DataMeta | None:
    """A prepared folder's meta.json, or None where there is none; one that cannot be read is the user's to fix."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(path, f"not a prepared dataset's meta.json: {exc}") from None
    if not isinstance(meta, dict) or not {"name", "input_shape", "output_size"} <= meta.keys():
        raise UserError(path, "not a prepared dataset's meta.json (no name, input_shape, output_size)")
    return data_meta(meta, path)


def spec_changes(meta: DataMeta, spec: StrictModel) -> list[str]:
    """How the dataset spec a folder was prepared from differs from `spec`: ['split.seed: 0 → 1', ...]."""
    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, sub in obj.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: obj}
    was, now = flat(meta.spec or {}), flat(spec.model_dump(mode="json"))
    return [f"{key}: {was.get(key, '(unset)')} → {now.get(key, '(unset)')}"
            for key in sorted({*was, *now}) if was.get(key) != now.get(key)]


def load_prepared(folder: str | Path) -> Prepared:
    folder = Path(folder)
    record = read_meta(folder)
    if record is None:
        raise UserError(folder, "not a prepared dataset (no meta.json); run `archlab prepare` first")
    # Where the data came from (in memory only, never written to meta.json): tasks that keep artifacts
    # beside the prepared folder find it here (the feature classifier of pipeline/quality.py).
    meta = record.model_copy(update={"prepared_dir": str(folder)})
    try:
        with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
            tensors = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(folder / "arrays.npz", f"cannot read the prepared arrays ({type(exc).__name__}: {exc}); "
                        "prepare the dataset again") from None
    if meta.target != "tokens" and meta.value_range is None:  # a folder prepared before it was recorded
        meta = meta.model_copy(update={"value_range": [float(tensors["train_x"].min()),
                                                       float(tensors["train_x"].max())]})
    return Prepared(meta=meta, tensors=tensors)
