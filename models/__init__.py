"""Model families. Importing this package fills the builder registry and defines the ModelSpec union."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

# The families, in the order the docs list them; each module registers its spec and builder on import.
# Adding a family = one new file plus its name here.
from models import mlp, cnn, resnet, rnn, seq2seq_rnn, vit, transformer, autoencoder, gan  # noqa: F401, I001
from models.registry import DataShape, build_model, registered_kinds, registered_specs

MODEL_SPECS = registered_specs()

ModelSpec = Annotated[Union[MODEL_SPECS], Field(discriminator="kind")]  # noqa: UP007 (a runtime tuple)

__all__ = ["MODEL_SPECS", "ModelSpec", "DataShape", "build_model", "registered_kinds"]
