"""Pure per-stage preprocessing: canonical rows -> token columns (input_ids, labels, ...) + per-row stats.

Every function takes a batch of rows and renders + encodes the whole batch with one encode call (see
preprocess_fit for the truncation policy). Labels follow the Hugging Face convention: ``labels[i]`` is
``input_ids[i]`` where the token is trained on, ``IGNORE_INDEX`` elsewhere; the model shifts them.
Which tokens are labelled comes from the rendered spans (structure), never from searching the text:

- a message with ``train: False`` is never labelled, not even under ``train_on_prompt``;
- a span with ``supervise`` (an assistant turn's content + end-of-turn) is labelled unless
  ``mask_history`` is set and its message is not the last assistant turn;
- every other span (prompt, role headers, history bodies under mask_history) is labelled only under
  ``train_on_prompt``.

A template with ``train_eos`` (GLM) ends every training sequence (sft, pairwise, kto) with it, as part of
the final response: supervised, once per sample, and kept when truncation cuts the response.

A message's ``weight`` becomes the per-token loss weight of its labelled tokens (1.0 for prompt tokens).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from tunesmith.data.encode import encode_batch
from tunesmith.data.fast_bpe import FastBPE
from tunesmith.data.packing import IGNORE_INDEX
from tunesmith.data.preprocess_fit import Codec, Fitted, Truncation, Unit, fit, gather
from tunesmith.data.templates import AutoTemplate, Template, render, with_train_eos
from tunesmith.data.types import Encoded, Message, Rendered, Row
from tunesmith.errors import DataError


@dataclass(frozen=True, slots=True)
class MaskingPolicy:
    """Which tokens carry loss (per-message ``train``/``weight`` from the data always apply)."""

    train_on_prompt: bool = False  # label every token, not only assistant turns
    mask_history: bool = False  # supervise only the last assistant turn


@dataclass(frozen=True, slots=True)
class RowStats:
    """What preprocessing did to one input row. Token counts before truncation unless said otherwise."""

    source: str
    prompt_tokens: int  # tokens before the (last) response; pairs: the longer prompt
    response_tokens: int  # the response's tokens incl. its role header; pairs: the longer response
    total_tokens: int  # the full sequence; pairs: the longer one
    truncated: bool = False
    response_truncated: bool = False  # the response's tail was cut: its end-of-turn is lost (train_eos stays)
    dropped: str | None = None  # "too_long" (truncation="drop") or "no_supervised_tokens"
    supervised_tokens: int = 0  # after truncation: labelled positions that get a loss (not index 0)


@dataclass(frozen=True, slots=True)
class Batch:
    """Columns of the kept rows (equal-length lists) and one RowStats per input row, dropped included."""

    columns: dict[str, list[Any]]
    stats: list[RowStats]

    def dropped(self) -> dict[str, int]:
        """Count of dropped rows per reason."""
        return dict(Counter(s.dropped for s in self.stats if s.dropped))


def _render(
    template: Template | AutoTemplate,
    enable_thinking: bool | None,
    messages: list[Message],
    tools: str,
    add_generation_prompt: bool,
) -> Rendered:
    rendered = render(
        template,
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )
    return rendered if add_generation_prompt else with_train_eos(template, rendered, messages)


def codec_for(
    template: Template | AutoTemplate,
    tokenizer: Any,
    enable_thinking: bool | None = None,
    fast: FastBPE | None = None,
) -> Codec:
    """The codec (renderer + one-call batch encoder) of a chat template and a tokenizer; picklable.

    ``fast``: the tokenizer's verified tiktoken twin (``fast_bpe.fast_bpe_for``), used when it can be.
    """
    return Codec(
        render=partial(_render, template, enable_thinking),
        encode=partial(encode_batch, tokenizer, fast=fast),
        tokenizer=tokenizer,
        train_eos=template.train_eos if isinstance(template, Template) else "",
    )


def _span_labels(
    conv: list[Message], enc: Encoded, target: int, masking: MaskingPolicy
) -> tuple[list[int], list[float]]:
    """Labels and loss weights of every token of one encoded conversation."""
    flags: list[tuple[bool, float]] = []
    for span in enc.spans:
        m = conv[span.message] if span.message >= 0 else None
        if m is not None and m.get("train", True) is False:
            flags.append((False, 0.0))  # header and body: the renderer marks such a body unsupervised
        elif span.supervise and m is not None:
            on = not masking.mask_history or span.message == target
            flags.append((on, float(m.get("weight", 1.0)) if on else 0.0))
        else:
            flags.append((masking.train_on_prompt, 1.0 if masking.train_on_prompt else 0.0))
    ids, ts = enc.input_ids, enc.token_span
    labels: list[int] = []
    weights: list[float] = []
    i, n = 0, len(ids)
    while i < n:  # one step per span run: token_span is non-decreasing
        k = ts[i]
        j = bisect_right(ts, k, i)
        on, w = flags[k]
        labels.extend(ids[i:j] if on else [IGNORE_INDEX] * (j - i))
        weights.extend([w] * (j - i))
        i = j
    return labels, weights


def _supervised(labels: list[int]) -> int:
    """Labelled positions that get a loss: index 0 is never predicted (nothing precedes it)."""
    return len(labels) - labels.count(IGNORE_INDEX) - (bool(labels) and labels[0] != IGNORE_INDEX)


def _stats(row: Row, f: Fitted, dropped: str | None = None, supervised: int = 0) -> RowStats:
    return RowStats(
        source=row.get("source", ""),
        prompt_tokens=f.prompt_tokens,
        response_tokens=f.response_tokens,
        total_tokens=f.total_tokens,
        truncated=f.truncated,
        response_truncated=f.response_truncated,
        dropped=dropped,
        supervised_tokens=supervised,
    )


def _labelled(f: Fitted, g: int, masking: MaskingPolicy) -> tuple[list[int], list[int], list[float]]:
    """Kept input_ids, labels and weights of sequence g (the response is its conversation's last turn)."""
    conv = f.conversations[g]
    labels, weights = _span_labels(conv, f.encoded[g], len(conv) - 1, masking)
    return f.ids(g), gather(labels, f.keep[g]), gather(weights, f.keep[g])


def _split_last(row: Row, stage: str) -> Unit:
    """A row whose messages end with the trained assistant turn, as prompt + response."""
    msgs = row.get("messages") or []
    if not msgs or msgs[-1]["role"] != "assistant":
        last = msgs[-1]["role"] if msgs else "no messages"
        raise DataError(
            row.get("source", "?"),
            f"a {stage} row must end with an assistant turn, got {last!r}",
            field="messages",
            fix="check the dataset's columns/tags mapping in dataset_info.json",
        )
    return Unit(prompt=list(msgs[:-1]), responses=(msgs[-1],), tools=row.get("tools", ""))


def sft_batch(
    rows: list[Row],
    *,
    codec: Codec,
    cutoff_len: int,
    masking: MaskingPolicy = MaskingPolicy(),
    truncation: Truncation = "keep_response",
    with_weights: bool | None = None,
) -> Batch:
    """sft rows -> input_ids, labels (+ weights: forced by with_weights, else when some weight != 1)."""
    if with_weights is None:
        with_weights = any(m.get("weight", 1.0) != 1.0 for r in rows for m in r["messages"])
    cols: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    if with_weights:
        cols["weights"] = []
    stats: list[RowStats] = []
    units = [_split_last(r, "sft") for r in rows]
    for _, [(ids, labels, weights)] in _fitted(rows, units, codec, cutoff_len, truncation, masking, stats):
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        if with_weights:
            cols["weights"].append(weights)
    return Batch(cols, stats)


def _fitted(
    rows: list[Row],
    units: list[Unit],
    codec: Codec,
    cutoff_len: int,
    truncation: Truncation,
    masking: MaskingPolicy,
    stats: list[RowStats],
) -> Iterator[tuple[Row, list[tuple[list[int], list[int], list[float]]]]]:
    """Fit and label rows; yields each kept row with (ids, labels, weights) per response and appends every
    row's stats to `stats`. A row is dropped when too long (drop mode) or when any response is left with
    no supervised token; its stats count the response with fewest."""
    for row, f in zip(rows, fit(units, codec, cutoff_len, truncation)):
        if f.too_long and truncation == "drop":
            stats.append(_stats(row, f, "too_long"))
            continue
        sides = [_labelled(f, g, masking) for g in range(len(f.encoded))]
        n_sup = min(_supervised(labels) for _, labels, _ in sides)
        if n_sup == 0:
            stats.append(_stats(row, f, "no_supervised_tokens"))
            continue
        stats.append(_stats(row, f, None, n_sup))
        yield row, sides


def pairwise_batch(
    rows: list[Row],
    *,
    codec: Codec,
    cutoff_len: int,
    masking: MaskingPolicy = MaskingPolicy(mask_history=True),
    truncation: Truncation = "keep_response",
) -> Batch:
    """rm/dpo rows -> chosen_/rejected_ input_ids and labels over one shared (equally cut) prompt.

    A pair is dropped when either side is left with no supervised token; its stats count the side
    with fewer.
    """
    units = []
    for r in rows:
        if "chosen" not in r or "rejected" not in r:
            raise DataError(
                r.get("source", "?"), "a ranking row needs both chosen and rejected", field="chosen"
            )
        units.append(
            Unit(
                prompt=list(r.get("messages", [])),
                responses=(r["chosen"], r["rejected"]),
                tools=r.get("tools", ""),
            )
        )
    names = ("chosen", "rejected")
    cols: dict[str, list[Any]] = {f"{s}_{c}": [] for s in names for c in ("input_ids", "labels")}
    stats: list[RowStats] = []
    for _, sides in _fitted(rows, units, codec, cutoff_len, truncation, masking, stats):
        for name, (ids, labels, _) in zip(names, sides):
            cols[f"{name}_input_ids"].append(ids)
            cols[f"{name}_labels"].append(labels)
    return Batch(cols, stats)


def kto_batch(
    rows: list[Row],
    *,
    codec: Codec,
    cutoff_len: int,
    masking: MaskingPolicy = MaskingPolicy(mask_history=True),
    truncation: Truncation = "keep_response",
) -> Batch:
    """kto rows -> input_ids, labels, kto_tag (True: desirable). KL pairs are the collator's concern."""
    for r in rows:
        if not isinstance(r.get("kto_tag"), bool):
            raise DataError(
                r.get("source", "?"),
                "a kto row needs a boolean kto_tag",
                field="kto_tag",
                expected="true (desirable) or false",
            )
    cols: dict[str, list[Any]] = {"input_ids": [], "labels": [], "kto_tag": []}
    stats: list[RowStats] = []
    units = [_split_last(r, "kto") for r in rows]
    for row, [(ids, labels, _)] in _fitted(rows, units, codec, cutoff_len, truncation, masking, stats):
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["kto_tag"].append(row["kto_tag"])
    return Batch(cols, stats)


PROMPT_COLUMNS = ("input_ids", "prompt_text", "label_text", "prompt_messages", "row_source")


def prompt_batch(
    rows: list[Row], *, codec: Codec, cutoff_len: int, truncation: Truncation = "keep_response"
) -> Batch:
    """Prompt-only rows (predict, ppo, grpo) -> input_ids of the prompt + generation prompt, prompt_text,
    label_text (the last assistant turn's content, "" when none), prompt_messages (JSON text of the
    prompt's canonical messages), row_source (the row's file:line (record i)) and every ``extra`` column
    as is.

    A trailing assistant turn is the reference, not part of the prompt. Missing extras are None.
    """
    units, labels = [], []
    for r in rows:
        msgs = list(r.get("messages") or [])
        ref = msgs.pop() if msgs and msgs[-1]["role"] == "assistant" else None
        labels.append(ref["content"] if ref else "")
        units.append(Unit(prompt=msgs, tools=r.get("tools", "")))
    extra_keys = list(dict.fromkeys(k for r in rows for k in r.get("extra", {})))
    for r in rows:
        clash = set(r.get("extra", {})) & set(PROMPT_COLUMNS)
        if clash:
            raise DataError(
                r.get("source", "?"),
                f"extra column {sorted(clash)[0]!r} clashes with an output column",
                field=sorted(clash)[0],
                fix="rename that column in the data or dataset_info.json",
            )
    cols: dict[str, list[Any]] = {c: [] for c in (*PROMPT_COLUMNS, *extra_keys)}
    stats, decode = [], []
    for row, unit, label, f in zip(rows, units, labels, fit(units, codec, cutoff_len, truncation)):
        if f.too_long and truncation == "drop":
            stats.append(_stats(row, f, "too_long"))
            continue
        ids = f.ids(0)
        if f.keep[0] != [(0, len(f.encoded[0].input_ids))]:
            decode.append(len(cols["input_ids"]))  # sliced tokens: the rendered text no longer matches
        cols["input_ids"].append(ids)
        cols["prompt_text"].append(f.rendered[0].text)
        cols["label_text"].append(label)
        cols["prompt_messages"].append(orjson.dumps(unit.prompt).decode())
        cols["row_source"].append(row.get("source", ""))
        for k in extra_keys:
            cols[k].append(row.get("extra", {}).get(k))
        stats.append(_stats(row, f))
    if decode:
        texts = codec.tokenizer.batch_decode([cols["input_ids"][i] for i in decode])
        for i, text in zip(decode, texts):
            cols["prompt_text"][i] = text
    return Batch(cols, stats)


def pt_batch(
    texts: list[str],
    *,
    tokenizer: Any,
    cutoff_len: int,
    eos: str,
    packing: bool,
    bos: str | None = None,
    fast: FastBPE | None = None,
) -> Batch:
    """Pretraining documents -> input_ids, labels (= input_ids) blocks of at most cutoff_len tokens.

    Every document gets ``eos`` appended (``bos`` prepended when given). packing=False concatenates the
    batch's documents and cuts the stream into cutoff_len blocks (LLaMA-Factory's behaviour, except that
    the last, shorter block is kept rather than dropped). packing=True keeps documents whole, splitting
    only those longer than cutoff_len, one sequence each, for the packer.
    """
    eos_id = _token_id(tokenizer, eos, "eos")
    bos_ids = [_token_id(tokenizer, bos, "bos")] if bos else []
    ids = fast.encode_texts(texts) if fast is not None else None
    if ids is None:
        # The Rust backend directly: no per-call Python overhead, no "longer than model_max_length" warning.
        ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    docs = [bos_ids + d + [eos_id] for d in ids]
    stats = [
        RowStats(
            "", 0, len(d), len(d), truncated=packing and len(d) > cutoff_len, supervised_tokens=len(d) - 1
        )
        for d in docs
    ]
    if packing:
        blocks = [d[i : i + cutoff_len] for d in docs for i in range(0, len(d), cutoff_len)]
    else:
        stream = [t for d in docs for t in d]
        blocks = [stream[i : i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    return Batch({"input_ids": blocks, "labels": [list(b) for b in blocks]}, stats)


def _token_id(tokenizer: Any, token: str, what: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise DataError(
            "tokenizer",
            f"{what} token {token!r} is not in the tokenizer's vocabulary",
            field=what,
            fix="set the template's eos/bos to a token of this tokenizer",
        )
    return tid


def kind_kwargs(
    kind: str,
    *,
    tokenizer: Any,
    template: Template | AutoTemplate,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    truncation: Truncation = "keep_response",
    enable_thinking: bool | None = None,
    packing: bool = False,
    fast: FastBPE | None = None,
) -> dict[str, Any]:
    """The (picklable) keyword arguments run_kind needs for a kind of preprocessing.

    Preference kinds (pairwise, kto) always supervise only the final response: history turns are
    context there, not targets. ``fast``: see codec_for.
    """
    if kind == "pt":
        return {
            "tokenizer": tokenizer,
            "cutoff_len": cutoff_len,
            "eos": tokenizer.eos_token,
            "packing": packing,
            "fast": fast,
        }
    out: dict[str, Any] = {
        "codec": codec_for(template, tokenizer, enable_thinking, fast),
        "cutoff_len": cutoff_len,
        "truncation": truncation,
    }
    if kind in ("sft", "pairwise", "kto"):
        out["masking"] = MaskingPolicy(train_on_prompt, mask_history or kind != "sft")
    return out


def run_kind(kind: str, rows: list[Row], **kwargs: Any) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Preprocess rows by kind; returns the columns and per-row stat columns + {"dropped": {reason: n}}."""
    if kind == "pt":
        batch = pt_batch([r["text"] for r in rows], **kwargs)
    else:
        batch = KINDS[kind](rows, **kwargs)
    st = batch.stats
    return batch.columns, {
        "prompt_tokens": [s.prompt_tokens for s in st],
        "response_tokens": [s.response_tokens for s in st],
        "total_tokens": [s.total_tokens for s in st],
        "supervised_tokens": [s.supervised_tokens for s in st],
        "truncated": [s.truncated for s in st],
        "dropped": batch.dropped(),
    }


KINDS = {"sft": sft_batch, "pairwise": pairwise_batch, "kto": kto_batch, "prompt": prompt_batch}
