"""Model families. Importing this package fills the builder registry and defines the ModelSpec union."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

# Each family's module registers its builder on import.
from models import autoencoder, cnn, gan, mlp, resnet, rnn, seq2seq_rnn, transformer, vit  # noqa: F401
from models.autoencoder import AutoencoderSpec
from models.cnn import CNNSpec
from models.gan import GANSpec
from models.mlp import MLPSpec
from models.registry import DataShape, build_model, registered_kinds
from models.resnet import ResNetSpec
from models.rnn import RNNSpec
from models.seq2seq_rnn import Seq2SeqRNNSpec
from models.transformer import TransformerSpec
from models.vit import ViTSpec

# Every family's spec class, in the order the docs list them. Adding a family = one import + one entry here.
MODEL_SPECS = (MLPSpec, CNNSpec, ResNetSpec, RNNSpec, Seq2SeqRNNSpec, ViTSpec, TransformerSpec, AutoencoderSpec,
               GANSpec)

ModelSpec = Annotated[MLPSpec | CNNSpec | ResNetSpec | RNNSpec | Seq2SeqRNNSpec | ViTSpec | TransformerSpec
                      | AutoencoderSpec | GANSpec, Field(discriminator="kind")]

__all__ = ["MODEL_SPECS", "ModelSpec", "DataShape", "build_model", "registered_kinds"]
