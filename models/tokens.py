"""The token-id convention every token dataset, task and model shares (seq2seq and language modelling).

Ids 0, 1, 2 are reserved; a dataset's own symbols start at FIRST_SYMBOL.
A seq2seq source is PAD-padded; a target ends with EOS, then PAD; the decoder's input starts with BOS.
"""
from __future__ import annotations

PAD = 0  # filler after the end of a sequence; never a training target
BOS = 1  # begin-of-sequence: the decoder's first input
EOS = 2  # end-of-sequence: the last target token
FIRST_SYMBOL = 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
