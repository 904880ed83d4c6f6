"""Byte-level BPE through tiktoken: the tokenizer's own ids, about four times faster.

Byte-level BPE tokenizers (Qwen, Llama 3, GPT-2/4 style, phi-4, tunesmith's tiny one) are what
tiktoken implements natively. For such a tokenizer we build a tiktoken ``Encoding`` from its vocabulary
and pre-tokenizer pattern and split the text at added tokens ourselves, as the Rust backend does (added
tokens are cut out first; every piece between them is pre-tokenized and merged on its own).

Equal ids are a promise, so they are checked, never assumed:

* ``fast_bpe_for`` accepts only tokenizers whose pipeline tiktoken reproduces (no or NFC normaliser, a
  regex split + byte-level pre-tokenizer, plain added tokens, merge order = id order) and then encodes a
  probe corpus (scripts, digits, whitespace runs, code, emoji) both ways; any difference -> None.
* ``FastBPE.encode`` re-encodes every ``check_every``-th text with the Rust backend. On the first
  difference it stops trusting itself: that batch and every later one go through the backend, and a
  warning says so.

Rows whose text NFC would change go through the backend too (their offsets differ from the text's).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any

from tunesmith.data.types import Encoded, Rendered

log = logging.getLogger("tunesmith")

# The pattern of a ByteLevel pre-tokenizer with use_regex=True (GPT-2's).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBE_TEXTS = (
    "Hello world! It's a test: don't, can't, we'll, I'd, you're, they've, I'm.",
    "  leading and trailing spaces   \n\n\tTabs\tand\r\nCRLF\n   \n",
    "Numbers 0 12 345 6789 3.14159 1,000,000 2024-11-27 +49 (0)30 123456",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "中文分词测试，这是一个句子。日本語のテキスト。한국어 문장입니다.",
    "Ünïcödé café naïve façade Straße ΑΒΓ αβγ Кириллица עברית العربية हिन्दी",
    "Emoji 😀👍🏽 🇩🇪 ‍👨‍👩‍👧 and symbols ©®™ ≤≥≠ → ← ∑∫ ½ ¾",
    "URL https://example.com/path?q=1&r=two#frag e-mail a.b@c.de @user #tag $100 50% ~/x",
    "UPPER lower MiXeD CamelCase snake_case kebab-case SCREAMING_SNAKE __dunder__ ...... !!!???",
    "line1\nline2\n\n\nline3 \n \n  x\u00a0nbsp\u2003emspace\u200bzwsp",
    "'''quoted''' \"\"\"doc\"\"\" `code` ``double`` 's 'S 'LL 'Ve",
)


@dataclass
class FastBPE:
    """A verified tiktoken twin of a byte-level BPE tokenizer (build it with ``fast_bpe_for``)."""

    encoding: Any  # tiktoken.Encoding
    backend: Any  # the tokenizers.Tokenizer it must agree with
    added: dict[str, int]  # added-token text -> id
    splitter: re.Pattern | None  # added tokens, longest first (the backend's leftmost-longest match)
    nfc: bool  # the backend normalises with NFC
    byte_len: list[int]  # bytes of each token id (token start offsets without the backend's offsets)
    check_every: int = 64
    trusted: bool = True
    seen: int = field(default=0)

    def encode(self, rendered: Sequence[Rendered]) -> list[Encoded] | None:
        """Encoded rows equal to the backend's; None when this batch must go through the backend."""
        if not self.trusted:
            return None
        out: list[Encoded] = []
        for r in rendered:
            e = self.encode_one(r)
            if e is None:
                return None
            out.append(e)
        return out if self._spot_check([r.text for r in rendered], [e.input_ids for e in out]) else None

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]] | None:
        """Token ids of plain texts (no spans); None when they must go through the backend."""
        if not self.trusted:
            return None
        out: list[list[int]] = []
        for text in texts:
            split = self._split_encode(text, [])
            if split is None:
                return None
            out.append(split[0])
        return out if self._spot_check(texts, out) else None

    def encode_one(self, r: Rendered) -> Encoded | None:
        split = self._split_encode(r.text, [s.start for s in r.spans[1:]])
        if split is None:
            return None
        ids, starts = split
        token_span = list(
            chain.from_iterable(repeat(k, starts[k + 1] - starts[k]) for k in range(len(starts) - 1))
        )
        return Encoded(input_ids=ids, token_span=token_span, spans=r.spans)

    def _spot_check(self, texts: Sequence[str], ids: list[list[int]]) -> bool:
        """Every check_every-th text (counted across calls) re-encoded by the backend must match."""
        for i in range(-self.seen % self.check_every, len(texts), self.check_every):
            reference = self.backend.encode(texts[i], add_special_tokens=False).ids
            if reference != ids[i]:
                self.trusted = False
                log.warning(
                    "the fast tokenizer path disagreed with the tokenizer on a row (%d vs %d tokens); "
                    "tokenizing the rest with the tokenizer itself",
                    len(ids[i]),
                    len(reference),
                )
                return False
        self.seen += len(texts)
        return True

    def _split_encode(self, text: str, bounds: list[int]) -> tuple[list[int], list[int]] | None:
        """Ids of text and, per span boundary (char offsets), the first token starting at or after it."""
        ascii_text = text.isascii()
        if not ascii_text and self.nfc and not unicodedata.is_normalized("NFC", text):
            return None
        pieces = self.splitter.split(text) if self.splitter is not None else [text]
        starts = [0]
        b = 0  # next boundary to place
        ids: list[int] = []
        pos = 0
        encode = self.encoding.encode_ordinary
        for j, piece in enumerate(pieces):
            if not piece:
                continue
            end = pos + len(piece)
            while b < len(bounds) and bounds[b] <= pos:  # boundaries at or before this piece's start
                starts.append(len(ids))
                b += 1
            if j % 2:  # an added token (with the whitespace an lstrip / rstrip token takes along)
                i = self.added.get(piece)
                ids.append(self.added[piece.strip()] if i is None else i)
                while b < len(bounds) and bounds[b] < end:  # inside the token: the next token starts after
                    starts.append(len(ids))
                    b += 1
            else:
                toks = encode(piece)
                if b < len(bounds) and bounds[b] < end:
                    b = self._place(piece, pos, toks, bounds, b, len(ids), starts, ascii_text)
                ids.extend(toks)
            pos = end
        starts.extend(repeat(len(ids), len(bounds) - b + 1))  # boundaries past the last token, and the end
        return ids, starts

    def _place(
        self,
        piece: str,
        pos: int,
        toks: list[int],
        bounds: list[int],
        b: int,
        base: int,
        starts: list[int],
        ascii_text: bool,
    ) -> int:
        """Token index of each boundary inside a plain piece: the first token starting at or after it."""
        end = pos + len(piece)
        at, t = 0, 0  # byte offset of token t's start within the piece
        while b < len(bounds) and bounds[b] < end:
            rel = bounds[b] - pos
            target = rel if ascii_text else len(piece[:rel].encode())
            while t < len(toks) and at < target:
                at += self.byte_len[toks[t]]
                t += 1
            starts.append(base + t)
            b += 1
        return b


def fast_bpe_for(tokenizer: Any) -> FastBPE | None:
    """A verified FastBPE for a transformers fast tokenizer, or None when it must not be used."""
    try:
        import tiktoken
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pattern = _pattern(spec)
    if pattern is None:
        return None
    ranks, added = _ranks(spec)
    if ranks is None:
        return None
    try:
        encoding = tiktoken.Encoding(
            f"tunesmith-{id(backend)}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )
    except Exception:  # noqa: BLE001 - a pattern tiktoken's regex engine rejects: not eligible
        return None
    byte_len = [0] * (max([*ranks.values(), *added.values()]) + 1)
    for tok, i in ranks.items():
        byte_len[i] = len(tok)
    for text, i in added.items():
        byte_len[i] = len(text.encode())
    strip = {a["content"]: (a.get("lstrip"), a.get("rstrip")) for a in spec.get("added_tokens") or []}
    alternatives = [
        (r"\s*" if strip[t][0] else "") + re.escape(t) + (r"\s*" if strip[t][1] else "")
        for t in sorted(added, key=len, reverse=True)
    ]
    splitter = re.compile("(" + "|".join(alternatives) + ")") if added else None
    fast = FastBPE(encoding, backend, added, splitter, spec.get("normalizer") is not None, byte_len)
    if not _agrees(fast, backend):
        return None
    return fast


def _pattern(spec: dict) -> str | None:
    """The pre-tokenizer's split pattern when the pipeline is one tiktoken reproduces."""
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return _GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in (split.get("pattern") or {})
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    return split["pattern"]["Regex"]


def _ranks(spec: dict) -> tuple[dict[bytes, int] | None, dict[str, int]]:
    """Token bytes -> id (the merge rank tiktoken needs) and the added tokens; None when unusable."""
    added: dict[str, int] = {}
    for a in spec.get("added_tokens") or []:
        if a.get("single_word"):
            return None, {}
        added[a["content"]] = a["id"]
    u2b = _unicode_to_byte()
    model = spec["model"]
    ranks: dict[bytes, int] = {}
    for tok, i in model["vocab"].items():
        try:
            ranks[bytes(u2b[c] for c in tok)] = i
        except KeyError:
            return None, {}
    if len(ranks) != len(model["vocab"]) or any(bytes([b]) not in ranks for b in range(256)):
        return None, {}
    # tiktoken merges the pair whose result has the lowest id; the backend the pair listed first.
    # They agree when the merges produce ids in increasing order.
    vocab, last = model["vocab"], -1
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i < last:  # equal: several splits of one token (tiktoken-converted vocabularies)
            return None, {}
        last = i
    return ranks, added


def _unicode_to_byte() -> dict[str, int]:
    """The byte-level alphabet: printable stand-ins for the 256 byte values (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _agrees(fast: FastBPE, backend: Any) -> bool:
    """The probe corpus (and the added tokens inside text) encodes identically both ways."""
    texts = list(PROBE_TEXTS)
    if fast.added:
        toks = sorted(fast.added)[:8]
        texts.append("x" + " a ".join(toks) + "\n" + "".join(toks) + " end")
    for text in texts:
        mine = fast.encode_one(Rendered(text, ()))
        if mine is None or mine.input_ids != backend.encode(text, add_special_tokens=False).ids:
            return False
    return True


__all__ = ["FastBPE", "PROBE_TEXTS", "fast_bpe_for"]
