"""Dataset specs: the sources a dataset can come from, as declared under `datasets:` in params.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from models.base import StrictModel

# ── dataset specs (declared under `datasets:` in params.yaml) ────────────────
NormaliseName = Literal["auto", "none", "global", "channel", "feature"]


class SplitSpec(StrictModel):
    """How the data is split, and how its inputs are standardised with the training split's statistics."""

    val_fraction: float = Field(default=0.15, ge=0.0, lt=0.5, description="Share of the training data held out "
                                "for validation. 0: no validation split, every non-test example trains; the best "
                                "epoch is then the last, and what needs validation data is refused: early "
                                "stopping on a val/ metric, data.split_seed, `vary: split`, a sweep, a claim "
                                "measured by epochs_to.")
    test_fraction: float = Field(default=0.15, gt=0.0, lt=0.5, description="Share held out for testing, when the "
                                 "source has no test split of its own.")
    seed: int = Field(default=0, ge=0, description="Seed of the split.")
    normalise: NormaliseName = Field(default="auto", description="Standardise the inputs to mean 0, std 1 with the "
                                     "training split's statistics: none; global (one mean and std); channel (one "
                                     "per channel of (C, L) and (C, H, W) inputs; (L,) signals and tables are one "
                                     "channel); feature (one per input element: every feature, position or pixel). "
                                     "auto (the default): feature for tables and (L,) signals, channel for (C, L) "
                                     "signals and images.")

    @property
    def validates(self) -> bool:
        """Whether a validation split is held out (val_fraction 0 holds none)."""
        return self.val_fraction > 0


class DigitsSource(StrictModel):
    source: Literal["digits"] = Field(description="scikit-learn's 8x8 handwritten digits, 10 classes.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class Mnist1dSource(StrictModel):
    source: Literal["mnist1d"] = Field(description="MNIST-1D signals (length 40, 10 classes) from the mnist1d "
                                       "package's generator with its default arguments; its test split is kept.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class DiabetesSource(StrictModel):
    source: Literal["diabetes"] = Field(description="scikit-learn's diabetes regression table (10 features).")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class NpzSource(StrictModel):
    source: Literal["npz"] = Field(description="A .npz file with arrays x, y and optionally x_test, y_test.")
    path: Path = Field(description="Path of the .npz file.")
    target: Literal["auto", "class", "value"] = Field(default="auto", description="Whether y holds class labels or "
                                                      "values; auto: integers are classes.")
    num_classes: PositiveInt | None = Field(default=None, description="Number of classes; labels must lie in "
                                            "[0, num_classes). Default: largest label + 1.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class TableSource(StrictModel):
    source: Literal["table"] = Field(description="A CSV or Parquet table read with pandas.")
    path: Path = Field(description="Path of the .csv or .parquet file.")
    target_column: str = Field(description="Name of the column to predict; every other column is a feature.")
    target: Literal["auto", "class", "value"] = Field(default="auto", description="Whether the target holds class "
                                                      "labels or values; auto: text and integers are classes.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class IdxSource(StrictModel):
    source: Literal["idx"] = Field(description="MNIST-format IDX files in a folder (train-images-idx3-ubyte, "
                                   "train-labels-idx1-ubyte, t10k-...; optionally .gz), e.g. MNIST or Fashion-MNIST.")
    path: Path = Field(description="Folder holding the four IDX files.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class SequenceSource(StrictModel):
    source: Literal["sequence"] = Field(description="Synthetic seq2seq pairs generated offline (pipeline/synthetic.py"
                                        "): reverse, sort or copy a random symbol string, or add two numbers.")
    task: Literal["reverse", "sort", "copy", "add"] = Field(default="reverse", description="reverse, sort or copy "
                                                            "the source string; add: 'a+b' → the digits of the sum.")
    symbols: int = Field(default=10, ge=2, le=1000, description="reverse/sort/copy: distinct symbols; add: the number "
                         "base (2 to 10). Token ids 0-2 are PAD, BOS, EOS; symbols follow.")
    min_len: PositiveInt = Field(default=1, description="Shortest source string (add: fewest digits per operand).")
    max_len: PositiveInt = Field(default=10, description="Longest source string (add: most digits per operand).")
    samples: int = Field(default=10000, ge=10, description="Pairs generated in all, before the split.")
    seed: int = Field(default=0, ge=0, description="Seed of the generator.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")

    @model_validator(mode="after")
    def _lengths_and_base(self) -> "SequenceSource":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len {self.min_len} is larger than max_len {self.max_len}")
        if self.task == "add" and self.symbols > 10:
            raise ValueError(f"add works in a base of 2 to 10 (symbols), got {self.symbols}")
        return self


class CorpusSource(StrictModel):
    source: Literal["corpus"] = Field(description="Character-level text for language modelling, cut into chunks of "
                                      "`context` characters. Default: generated offline from the project's small "
                                      "probabilistic grammar, whose exact entropy goes into meta.json.")
    path: Path | None = Field(default=None, description="A UTF-8 text file to use instead of the generated corpus.")
    characters: int = Field(default=300_000, ge=1000, description="Length of the generated corpus (ignored with "
                            "path).")
    context: int = Field(default=64, ge=2, description="Characters per training example; the model predicts each "
                         "from the ones before it in the same chunk.")
    seed: int = Field(default=0, ge=0, description="Seed of the generator.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split: the test set is the "
                             "text's tail, validation chunks are drawn from the rest.")


class MemorySource(StrictModel):
    source: Literal["memory"] = Field(description="Synthetic long-range recall, generated offline "
                                      "(pipeline/data/synthetic.py): a sequence of gap + 1 one-hot symbols, shape "
                                      "(symbols, gap + 1) as channels × steps; the class is the symbol at the first "
                                      "step, and the gap steps after it are random distractors. A model must carry "
                                      "the first symbol across the gap; chance is 1/symbols.")
    symbols: int = Field(default=8, ge=2, le=256, description="Distinct symbols: the number of classes and of "
                         "input channels.")
    gap: int = Field(default=20, ge=1, le=1000, description="Steps T between the symbol to recall and the end of "
                     "the sequence (each a random distractor); a sequence is T + 1 steps long.")
    samples: int = Field(default=6000, ge=10, description="Sequences generated in all, before the split.")
    seed: int = Field(default=0, ge=0, description="Seed of the generator.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split.")


class CorpusLabelsSource(StrictModel):
    source: Literal["corpus_labels"] = Field(description="Labelled text from the corpus's grammar, generated "
                                             "offline: each example is `context` characters starting at a "
                                             "sentence's start, labelled with that sentence's main verb class "
                                             "(intransitive, transitive, sentential: the rule its main clause's "
                                             "VP chose). Its characters are numbered as in the generated corpus, "
                                             "so an encoder pretrained there reads it.")
    samples: int = Field(default=3000, ge=20, description="Examples generated in all, before the split.")
    context: int = Field(default=64, ge=8, description="Characters per example (the corpus's context, so a "
                         "pretrained encoder's positions fit).")
    seed: int = Field(default=1, ge=0, description="Seed of the generator; the default differs from the "
                      "corpus's (0), so the probe's text is not the text an encoder was pretrained on.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How the data is split (stratified by class).")


DATASET_SOURCES: list[type[StrictModel]] = [DigitsSource, Mnist1dSource, DiabetesSource, NpzSource, TableSource,
                                            IdxSource, SequenceSource, CorpusSource, MemorySource, CorpusLabelsSource]
DatasetSpec = Annotated[DigitsSource | Mnist1dSource | DiabetesSource | NpzSource | TableSource | IdxSource
                        | SequenceSource | CorpusSource | MemorySource | CorpusLabelsSource,
                        Field(discriminator="source")]

# Built-in datasets usable by name without a declaration in params.yaml.
BUILTIN_DATASETS: dict[str, StrictModel] = {
    "digits": DigitsSource(source="digits"),
    "mnist1d": Mnist1dSource(source="mnist1d"),
    "diabetes": DiabetesSource(source="diabetes"),
}
