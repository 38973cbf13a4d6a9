"""The token-id convention every token dataset, task and model shares (seq2seq and language modelling).

Ids 0, 1, 2 are reserved; a dataset's own symbols start at FIRST_SYMBOL.
A seq2seq source is PAD-padded; a target ends with EOS, then PAD; the decoder's input starts with BOS.
A character corpus numbers its characters from 0 (no reserved ids: it needs none).
[MASK] (masked-language modelling) is not a data token: it takes the first id past the data's vocabulary, so no
dataset's numbering moves, and a token encoder's vocabulary is the data's plus one.
"""
from __future__ import annotations

PAD = 0  # filler after the end of a sequence; never a training target
BOS = 1  # begin-of-sequence: the decoder's first input
EOS = 2  # end-of-sequence: the last target token
FIRST_SYMBOL = 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
MASK_TOKEN = "<mask>"


def mask_id(data_vocab_size: int) -> int:
    """The id of [MASK] for data of `data_vocab_size` tokens: the first id past them."""
    return data_vocab_size


def with_mask(data_vocab_size: int) -> int:
    """A token encoder's vocabulary: the data's tokens and [MASK]."""
    return data_vocab_size + 1
