"""Data the project generates itself, offline and seeded: sequence tasks, a grammar's text, and recall.

- Sequence tasks (seq2seq): reverse, sort, copy, and multi-digit addition ("12+34" → "46").
  Ids follow models/tokens.py: 0 PAD, 1 BOS, 2 EOS, symbols from 3. Sources are PAD-padded; targets end in
  EOS, then PAD.
- A character corpus (lm) from a small probabilistic context-free grammar of English-like sentences. The
  grammar is LL(1) (the next word always tells which rule was used), so each text has exactly one derivation
  and the text's entropy is the derivation's: the sum, over the expected number of times each rule choice is
  made, of that choice's entropy. Per character, that is the lowest cross-entropy any model can reach.
- Long-range memory (classify): one-hot symbol sequences whose class is the symbol shown `gap` steps before
  the end.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from models.tokens import EOS, FIRST_SYMBOL, PAD, SPECIAL_TOKENS

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ── sequence tasks ───────────────────────────────────────────────────────────
@dataclass
class SequenceData:
    source: np.ndarray  # (N, S) int64, PAD-padded
    target: np.ndarray  # (N, T) int64, EOS then PAD
    itos: list[str]  # id → printable symbol


def symbol_names(symbols: int) -> list[str]:
    """Printable names for ids 0..: the special tokens, then a, b, c, ... (then [52], [53], ... past the letters)."""
    return [*SPECIAL_TOKENS, *(_LETTERS[i] if i < len(_LETTERS) else f"[{i}]" for i in range(symbols))]


def _with_eos(body: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(N, L) PAD-padded bodies → (N, L + 1) with EOS right after each body."""
    out = np.concatenate([body, np.full((len(body), 1), PAD, dtype=np.int64)], axis=1)
    out[np.arange(len(body)), lengths] = EOS
    return out


def symbol_sequences(task: str, symbols: int, min_len: int, max_len: int, samples: int, seed: int) -> SequenceData:
    """reverse / sort / copy of random symbol strings with lengths uniform in [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=samples)
    valid = np.arange(max_len)[None, :] < lengths[:, None]  # (N, L)
    body = rng.integers(0, symbols, size=(samples, max_len)) + FIRST_SYMBOL
    source = np.where(valid, body, PAD).astype(np.int64)
    if task == "copy":
        out = source
    elif task == "reverse":
        # position j of the output holds input position length-1-j
        idx = np.clip(lengths[:, None] - 1 - np.arange(max_len)[None, :], 0, max_len - 1)
        out = np.where(valid, np.take_along_axis(source, idx, axis=1), PAD)
    elif task == "sort":
        big = np.iinfo(np.int64).max  # padding sorts last, then turns back into PAD
        out = np.sort(np.where(valid, source, big), axis=1)
        out = np.where(valid, out, PAD)
    else:
        raise ValueError(f"unknown symbol task {task!r}")
    return SequenceData(source, _with_eos(out.astype(np.int64), lengths), symbol_names(symbols))


def _digits(n: int, base: int) -> list[int]:
    out = []
    while True:
        n, d = divmod(n, base)
        out.append(d)
        if n == 0:
            return out[::-1]  # most significant digit first


def addition_sequences(base: int, min_digits: int, max_digits: int, samples: int, seed: int) -> SequenceData:
    """'a+b' → 'a+b's digits' with each operand's digit count uniform in [min_digits, max_digits], in `base`."""
    rng = np.random.default_rng(seed)
    plus = FIRST_SYMBOL + base
    src_len, tgt_len = 2 * max_digits + 1, max_digits + 2  # the sum may carry into one more digit; then EOS
    source = np.full((samples, src_len), PAD, dtype=np.int64)
    target = np.full((samples, tgt_len), PAD, dtype=np.int64)
    for i in range(samples):
        a, b = (_random_number(rng, base, int(rng.integers(min_digits, max_digits + 1))) for _ in range(2))
        src = [FIRST_SYMBOL + d for d in _digits(a, base)] + [plus] + [FIRST_SYMBOL + d for d in _digits(b, base)]
        tgt = [FIRST_SYMBOL + d for d in _digits(a + b, base)] + [EOS]
        source[i, :len(src)] = src
        target[i, :len(tgt)] = tgt
    itos = [*SPECIAL_TOKENS, *"0123456789"[:base], "+"]
    return SequenceData(source, target, itos)


def _random_number(rng: np.random.Generator, base: int, digits: int) -> int:
    """Uniform over the numbers with exactly `digits` digits (0 counts as a 1-digit number)."""
    low = 0 if digits == 1 else base ** (digits - 1)
    return int(rng.integers(low, base ** digits))


# ── long-range memory ────────────────────────────────────────────────────────
def memory_sequences(symbols: int, gap: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall over a gap: x (N, symbols, gap + 1) one-hot float32, channels × steps; y (N,) the symbol at step 0.

    Every step, the first included, is drawn uniformly and independently of the others, so the label is
    uniform (chance is 1/symbols) and the gap steps after it say nothing about it: only a model that carries
    step 0 to the end can beat chance.
    """
    rng = np.random.default_rng(seed)
    shown = rng.integers(0, symbols, size=(samples, gap + 1))  # (N, L): the symbol at each step
    x = np.zeros((samples, symbols, gap + 1), dtype=np.float32)
    x[np.arange(samples)[:, None], shown, np.arange(gap + 1)[None, :]] = 1.0
    return x, shown[:, 0].astype(np.int64)


# ── the grammar corpus ───────────────────────────────────────────────────────
def _zipf(words: str) -> list[tuple[float, list[str]]]:
    """A word class: its words with Zipf probabilities ∝ 1/rank, as in natural text."""
    names = words.split()
    weights = [1.0 / (r + 1) for r in range(len(names))]
    total = sum(weights)
    return [(w / total, [name]) for w, name in zip(weights, names)]


# Nonterminal → [(probability, right-hand side)]; a symbol that is not a key is a word. Every word class is
# disjoint from the others, which (with the rule shapes below) makes the grammar LL(1).
GRAMMAR: dict[str, list[tuple[float, list[str]]]] = {
    "S": [(1.0, ["NP", "VP"])],
    "NP": [(0.75, ["Det", "Adjs", "Noun", "Rel"]), (0.25, ["Name"])],
    "Adjs": [(0.3, ["Adj", "Adjs"]), (0.7, [])],
    "Rel": [(0.15, ["that", "VP"]), (0.85, [])],
    "VP": [(0.4, ["IVerb", "AdvOpt"]), (0.45, ["TVerb", "NP"]), (0.15, ["SVerb", "that", "S"])],
    "AdvOpt": [(0.35, ["Adv"]), (0.65, [])],
    "Det": _zipf("the a every some no this"),
    "Adj": _zipf("big small red quiet happy lazy clever green"),
    "Noun": _zipf("cat dog bird fox teacher farmer child robot horse poet"),
    "Name": _zipf("Alice Bob Carol Dave"),
    "IVerb": _zipf("slept ran laughed sang waited danced"),
    "TVerb": _zipf("saw liked chased helped found followed painted"),
    "SVerb": _zipf("said thought knew believed"),
    "Adv": _zipf("quickly slowly loudly today again"),
}
START = "S"


def _choose_rule(rng: np.random.Generator, rules: list[tuple[float, list[str]]]) -> int:
    """One rule's index by inverse-CDF choice: one uniform draw per expansion."""
    u, acc = rng.random(), 0.0
    for i, (p, _) in enumerate(rules):
        acc += p
        if u < acc:
            return i
    return len(rules) - 1  # u past the rounded sum of the probabilities: the last rule


def sample_sentence(rng: np.random.Generator, grammar: dict = GRAMMAR) -> str:
    """One sentence, expanded left to right with an explicit stack (no recursion limit): 'the cat ran.\\n'."""
    return sample_main_clause(rng, grammar)[0]


def sample_main_clause(rng: np.random.Generator, grammar: dict = GRAMMAR) -> tuple[str, int, int]:
    """A sentence as sample_sentence draws it (the very same draws), with the rule its main clause's VP chose
    (an index into grammar["VP"]) and the number of characters up to the end of that VP's verb."""
    words: list[str] = []
    stack = [(START, "root")]  # (symbol, "root" | "main": a child of the root | "": deeper)
    main_rule, verb_word = -1, -1
    while stack:
        symbol, place = stack.pop()
        if symbol not in grammar:
            words.append(symbol)
            continue
        rule = _choose_rule(rng, grammar[symbol])
        if place == "main" and symbol == "VP":
            main_rule, verb_word = rule, len(words)  # every VP rule starts with its verb
        stack.extend((s, "main" if place == "root" else "") for s in reversed(grammar[symbol][rule][1]))
    return " ".join(words) + ".\n", main_rule, len(" ".join(words[:verb_word + 1]))


def lexicon(grammar: dict = GRAMMAR) -> frozenset[str]:
    """Every word the grammar can produce."""
    return frozenset(sym for rules in grammar.values() for _, rhs in rules for sym in rhs if sym not in grammar)


def word_validity(text: str, grammar: dict = GRAMMAR) -> float | None:
    """The share of whole words in `text` that are words of the grammar (the first and last word may be cut
    off mid-word, so they are left out); None when fewer than one whole word."""
    words = re.split(r"[\s.]+", text)[1:-1]
    words = [w for w in words if w]
    if not words:
        return None
    known = lexicon(grammar)
    return sum(w in known for w in words) / len(words)


def generate_corpus(characters: int, seed: int, grammar: dict = GRAMMAR) -> str:
    """Whole sentences until at least `characters` characters."""
    rng = np.random.default_rng(seed)
    parts, size = [], 0
    while size < characters:
        sentence = sample_sentence(rng, grammar)
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)


def expected_expansions(grammar: dict = GRAMMAR) -> dict[str, float]:
    """How often each nonterminal is expanded per sentence: e = δ_S + Mᵀe, M[A, B] = expected B's in A's rule."""
    names = list(grammar)
    index = {n: i for i, n in enumerate(names)}
    m = np.zeros((len(names), len(names)))
    for a, rules in grammar.items():
        for p, rhs in rules:
            for sym in rhs:
                if sym in index:
                    m[index[a], index[sym]] += p
    if max(abs(np.linalg.eigvals(m))) >= 1:
        raise ValueError("the grammar's sentences are infinitely long on average (supercritical recursion)")
    start = np.zeros(len(names))
    start[index[START]] = 1.0
    e = np.linalg.solve(np.eye(len(names)) - m.T, start)
    return dict(zip(names, e.tolist()))


def grammar_entropy(grammar: dict = GRAMMAR) -> dict[str, float]:
    """Exact entropy of the generated text: bits per sentence, characters per sentence, bits per character.

    Each sentence is " ".join(words) + ".\\n", i.e. Σ(len(word) + 1) + 1 characters; sentences are independent
    and self-delimiting, so the text's entropy rate is bits per sentence / characters per sentence.
    """
    e = expected_expansions(grammar)
    bits = sum(e[a] * -sum(p * math.log2(p) for p, _ in rules if p > 0) for a, rules in grammar.items())
    chars = 1.0 + sum(e[a] * sum(p * sum(len(s) + 1 for s in rhs if s not in grammar) for p, rhs in rules)
                      for a, rules in grammar.items())
    return {"bits_per_sentence": bits, "chars_per_sentence": chars, "bits_per_char": bits / chars}


def sentence_log2_prob(sentence: str, grammar: dict = GRAMMAR) -> float:
    """log2 P(sentence) by LL(1) parsing: at each nonterminal, the next word picks the only rule that fits."""
    words = sentence.rstrip("\n").rstrip(".").split(" ")
    first = _first_sets(grammar)
    logp, pos, stack = 0.0, 0, [START]
    while stack:
        symbol = stack.pop()
        if symbol not in grammar:
            if pos >= len(words) or words[pos] != symbol:
                raise ValueError(f"{sentence!r} is not in the grammar")
            pos += 1
            continue
        nxt = words[pos] if pos < len(words) else None
        options = [(p, rhs) for p, rhs in grammar[symbol] if nxt in _first_of(rhs, first, grammar)]
        empty = [(p, rhs) for p, rhs in grammar[symbol] if not rhs]
        if not options and not empty:
            raise ValueError(f"{sentence!r} is not in the grammar")
        p, rhs = options[0] if options else empty[0]
        logp += math.log2(p)
        stack.extend(reversed(rhs))
    if pos != len(words):
        raise ValueError(f"{sentence!r} has words past the end of a sentence")
    return logp


def _first_of(rhs: list[str], first: dict[str, set[str]], grammar: dict) -> set[str]:
    """FIRST of a rule's right-hand side (the rules here start with a word or a non-nullable nonterminal)."""
    out: set[str] = set()
    for sym in rhs:
        if sym not in grammar:
            return out | {sym}
        out |= first[sym]
        if not any(not r for _, r in grammar[sym]):
            return out
    return out


def _first_sets(grammar: dict) -> dict[str, set[str]]:
    """FIRST(A): the words a string derived from A can start with (fixed-point iteration)."""
    first: dict[str, set[str]] = {a: set() for a in grammar}
    changed = True
    while changed:
        changed = False
        for a, rules in grammar.items():
            for _, rhs in rules:
                new = _first_of(rhs, first, grammar)
                if not new <= first[a]:
                    first[a] |= new
                    changed = True
    return first


# ── labelled text from the grammar (a probe of what a text encoder learned) ──
MAIN_VERB_CLASSES = ["intransitive", "transitive", "sentential"]  # grammar["VP"]'s rules, in their order


def grammar_alphabet(grammar: dict = GRAMMAR) -> list[str]:
    """Every character the grammar's text can hold, sorted: the generated corpus's vocabulary (its itos is
    sorted(set(text)), which is this for any text long enough to use every word)."""
    words = {s for rules in grammar.values() for _, rhs in rules for s in rhs if s not in grammar}
    return sorted(set("".join(words)) | set(" .\n"))


def main_verb_chunks(samples: int, context: int, seed: int, grammar: dict = GRAMMAR) -> tuple[list[str], np.ndarray]:
    """`samples` texts of `context` characters, each from fresh sentences: it starts where a sentence starts
    and runs on into the next ones. Its label is the first sentence's main verb class, the rule its top-level
    VP chose (MAIN_VERB_CLASSES). The first verb is not always the main one (`the dog that saw Bob slept.`),
    so a reader must parse, not spot a word. A sentence whose main verb ends past `context` characters is
    drawn again: the label can always be read from the text."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < samples:
        sentence, rule, verb_end = sample_main_clause(rng, grammar)
        if verb_end > context:
            continue
        text = sentence
        while len(text) < context:
            text += sample_sentence(rng, grammar)
        texts.append(text[:context])
        labels.append(rule)
    return texts, np.array(labels, dtype=np.int64)
