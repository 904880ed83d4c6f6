"""Fitting conversations into cutoff_len while keeping the response: the truncation policy.

A *unit* is one row's prompt plus 0, 1 or 2 responses that share it (prompt-only, sft/kto, pairwise).
Every sequence of a batch is rendered and encoded in ONE encode call. Units longer than cutoff_len are
then fitted in this order (each step only when the previous one was not enough):

1. The response budget is fixed first: each response keeps ``cutoff_len - min(prompt_tokens,
   cutoff_len // 4)`` tokens at most, so a response is cut only when it alone exceeds the budget left
   after a floor of prompt (a quarter of cutoff_len, or the whole prompt when shorter). Pairs share one
   prompt budget: ``cutoff_len`` minus the longer kept response.
2. Whole history exchanges are dropped, oldest first (an exchange starts at a user turn; leading system
   messages and the last exchange are never dropped), and the shorter conversation is re-rendered, so
   the template's structure stays exact.
3. The last user message's content is cut from its start (its role header and end-of-turn stay), using
   the tokenizer's offsets of that content, and the conversation is re-rendered. Re-render rounds are
   batched (one encode call per round for all affected units, at most ``_ROUNDS`` rounds).
4. Whatever still does not fit is sliced from the token arrays: the head (BOS and leading system
   turns, at most half of the prompt budget) is kept, then the prompt's last tokens, then the response's
   first tokens. Cutting the response loses its end-of-turn/EOS; ``response_truncated`` records it.
   A template's ``train_eos`` (GLM) is the exception: it stays the sequence's last token(s), so a cut
   answer still ends with the stop token (LLaMA-Factory reserves room for its efficient_eos the same way).

Token-level slicing alone would be one tokenizer call cheaper, but it can cut a role header in half
and depends on how a template joins turns; re-rendering is exact for every template.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tunesmith.data.types import Encoded, Message, Rendered
from tunesmith.errors import TunesmithError

Truncation = Literal["keep_response", "drop"]
RenderFn = Callable[[list[Message], str, bool], Rendered]  # (messages, tools, add_generation_prompt)
EncodeFn = Callable[[list[Rendered]], list[Encoded]]
_ROUNDS = 3  # re-render rounds; in practice one, a second when in-context tokenization differs


@dataclass(frozen=True)
class Codec:
    """How messages become tokens: a renderer, a batch encoder (one tokenizer call) and the tokenizer."""

    render: RenderFn
    encode: EncodeFn
    tokenizer: Any  # a transformers fast tokenizer: offsets for content cuts, decode of sliced prompts
    train_eos: str = ""  # the text `render` ends every training sequence with (its last span): never cut


@dataclass(frozen=True)
class Unit:
    """One row's prompt and the responses that share it (none: rendered with the generation prompt)."""

    prompt: list[Message]
    responses: tuple[Message, ...] = ()
    tools: str = ""

    def conversations(self, prompt: list[Message]) -> list[list[Message]]:
        if not self.responses:
            return [prompt]
        return [[*prompt, r] for r in self.responses]


@dataclass
class Fitted:
    """A unit after fitting: the final conversations, their encodings and the token ranges kept."""

    conversations: list[list[Message]]
    rendered: list[Rendered]
    encoded: list[Encoded]
    prompt_tokens: int  # before truncation (the longest of the sequences' prompts)
    response_tokens: int  # before truncation (the longest response; the generation prompt when none)
    total_tokens: int  # before truncation (the longest sequence)
    keep: list[list[tuple[int, int]]] = field(default_factory=list)  # per sequence: [start, end) ranges
    too_long: bool = False
    truncated: bool = False
    response_truncated: bool = False

    def ids(self, g: int) -> list[int]:
        """The kept token ids of sequence g."""
        return gather(self.encoded[g].input_ids, self.keep[g])


def gather(values: list[Any], ranges: list[tuple[int, int]]) -> list[Any]:
    """Concatenate values[a:b] over ranges."""
    if len(ranges) == 1 and ranges[0] == (0, len(values)):
        return values
    out: list[Any] = []
    for a, b in ranges:
        out.extend(values[a:b])
    return out


def prompt_length(enc: Encoded, n_prompt_messages: int) -> int:
    """Tokens up to the last one of a prompt message (index < n_prompt_messages); the rest is response."""
    last = -1
    for k, span in enumerate(enc.spans):
        if 0 <= span.message < n_prompt_messages:
            last = k
    return bisect_right(enc.token_span, last) if last >= 0 else 0


def _head_length(enc: Encoded, messages: list[Message]) -> int:
    """Leading tokens of no message (BOS) or of leading system messages."""
    for k, span in enumerate(enc.spans):
        if span.message >= 0 and messages[span.message]["role"] != "system":
            return bisect_left(enc.token_span, k)
    return len(enc.input_ids)


def _message_tokens(enc: Encoded) -> dict[int, int]:
    """Token count per message index."""
    counts: dict[int, int] = {}
    ts = enc.token_span
    for k, span in enumerate(enc.spans):
        n = bisect_right(ts, k) - bisect_left(ts, k)
        counts[span.message] = counts.get(span.message, 0) + n
    return counts


def _exchanges(prompt: list[Message]) -> list[list[int]]:
    """Message indices grouped into exchanges, each starting at a user turn; leading system excluded."""
    groups: list[list[int]] = []
    for i, m in enumerate(prompt):
        if m["role"] == "system" and not groups:
            continue
        if m["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(i)
    return groups


def _last_user(prompt: list[Message]) -> int:
    return max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=-1)


@dataclass
class _State:
    """Mutable fitting state of one over-long unit."""

    prompt: list[Message]
    floor: int  # prompt tokens always kept when the prompt has them
    overflow: int = 0  # prompt tokens over the prompt budget, measured on the current encoding
    cut_tokens: int = 0  # tokens to cut from the last user content this round


def _encode_all(units: Sequence[Unit], prompts: Sequence[list[Message]], codec: Codec) -> list[Fitted]:
    """Render every sequence of every unit and encode them all in one call."""
    convs = [u.conversations(p) for u, p in zip(units, prompts)]
    rendered = [[codec.render(c, u.tools, not u.responses) for c in cs] for u, cs in zip(units, convs)]
    flat = codec.encode([r for rs in rendered for r in rs])
    out, at = [], 0
    for cs, rs in zip(convs, rendered):
        encs = flat[at : at + len(rs)]
        at += len(rs)
        out.append(Fitted(cs, rs, encs, 0, 0, 0))
    return out


def _measure(f: Fitted, n_prompt: int) -> tuple[list[int], list[int]]:
    ps = [prompt_length(e, n_prompt) for e in f.encoded]
    return ps, [len(e.input_ids) - p for e, p in zip(f.encoded, ps)]


def _budgets(f: Fitted, n_prompt: int, floor: int, cutoff: int) -> tuple[list[int], list[int], int]:
    """Prompt lengths, kept response lengths and the shared prompt budget of the current encoding."""
    ps, rs = _measure(f, n_prompt)
    r_keep = [min(r, cutoff - floor) for r in rs]
    return ps, r_keep, cutoff - max(r_keep)


def fit(units: Sequence[Unit], codec: Codec, cutoff_len: int, truncation: Truncation) -> list[Fitted]:
    """Encode units (one encode call) and fit each into cutoff_len by the module's policy."""
    if cutoff_len < 1:
        raise TunesmithError(f"cutoff_len must be at least 1, got {cutoff_len}; set cutoff_len in the config")
    fitted = _encode_all(units, [u.prompt for u in units], codec)
    for u, f in zip(units, fitted):
        ps, rs = _measure(f, len(u.prompt))
        f.prompt_tokens, f.response_tokens = max(ps), max(rs)
        f.total_tokens = max(len(e.input_ids) for e in f.encoded)
        f.keep = [[(0, len(e.input_ids))] for e in f.encoded]
        f.too_long = f.total_tokens > cutoff_len
    long = [i for i, f in enumerate(fitted) if f.too_long]
    if truncation == "drop" or not long:
        return fitted
    states = {i: _State(list(units[i].prompt), min(fitted[i].prompt_tokens, cutoff_len // 4)) for i in long}
    for _ in range(_ROUNDS):
        todo = _plan_round(fitted, states, codec, cutoff_len)
        if not todo:
            break
        refit = _encode_all([units[i] for i in todo], [states[i].prompt for i in todo], codec)
        for i, f in zip(todo, refit):
            old = fitted[i]
            old.conversations, old.rendered, old.encoded, old.truncated = (
                f.conversations,
                f.rendered,
                f.encoded,
                True,
            )
    for i in long:
        tail = codec.train_eos if units[i].responses else ""
        _slice(fitted[i], len(states[i].prompt), states[i].floor, cutoff_len, tail)
    return fitted


def _plan_round(fitted: list[Fitted], states: dict[int, _State], codec: Codec, cutoff: int) -> list[int]:
    """Edit the prompts of units still over budget (drop history, then cut content); return those edited."""
    todo, cuts = [], []
    for i, st in states.items():
        f = fitted[i]
        ps, _, budget = _budgets(f, len(st.prompt), st.floor, cutoff)
        st.overflow = max(ps) - budget
        if st.overflow <= 0:
            continue
        counts = _message_tokens(f.encoded[0])
        dropped: set[int] = set()
        for g in _exchanges(st.prompt)[:-1]:
            if st.overflow <= 0:
                break
            dropped.update(g)
            st.overflow -= sum(counts.get(j, 0) for j in g)
        if dropped:
            st.prompt = [m for j, m in enumerate(st.prompt) if j not in dropped]
        u = _last_user(st.prompt)
        if st.overflow > 0 and u >= 0 and st.prompt[u]["content"]:
            # Only the content's head is tokenized: about twice the chars the cut needs, from the
            # message's chars per token (an underestimate: its token count includes the role header).
            content = st.prompt[u]["content"]
            per_token = len(content) / max(1, counts.get(u + len(dropped), 1))
            st.cut_tokens = st.overflow
            cuts.append((i, u, content[: int(2 * st.overflow * per_token) + 64]))
        elif dropped:
            todo.append(i)
    if cuts:
        offsets = codec.tokenizer(
            [h for _, _, h in cuts], add_special_tokens=False, return_offsets_mapping=True
        )
        for (i, u, head), offs in zip(cuts, offsets["offset_mapping"]):
            st = states[i]
            content, k = st.prompt[u]["content"], st.cut_tokens
            # not the head's last token: a word cut short by the head may tokenize differently
            if k + 1 < len(offs):
                at = offs[k][0]
            else:  # the head is too short: cut it all, the next round measures again
                at = len(content) if len(head) == len(content) else len(head)
            st.prompt = list(st.prompt)
            st.prompt[u] = {**st.prompt[u], "content": content[at:]}
            todo.append(i)
    return sorted(todo)


def _tail_tokens(enc: Encoded, rendered: Rendered, tail: str) -> int:
    """Tokens of the last span when it is the ``tail`` text (a template's train_eos), else 0."""
    if not tail or not enc.spans or rendered.text[enc.spans[-1].start : enc.spans[-1].end] != tail:
        return 0
    return len(enc.token_span) - bisect_left(enc.token_span, len(enc.spans) - 1)


def _slice(f: Fitted, n_prompt: int, floor: int, cutoff: int, tail: str = "") -> None:
    """Final exact fit: keep the head, the prompt's tail and the response's start (+ its ``tail`` text,
    a template's train_eos, which stays last) of every sequence."""
    ps, r_keep, budget = _budgets(f, n_prompt, floor, cutoff)
    keep = []
    for g, enc in enumerate(f.encoded):
        p, n, r = ps[g], len(enc.input_ids), r_keep[g]
        p_keep = min(p, budget)
        if p_keep < p:
            h = min(_head_length(enc, f.conversations[g]), p, p_keep // 2)
            ranges = [(0, h), (p - (p_keep - h), p)]
            f.truncated = True
        else:
            ranges = [(0, p)]
        if p + r < n:
            f.truncated = f.response_truncated = True
            t = min(r, _tail_tokens(enc, f.rendered[g], tail))
            ranges += [(p, p + r - t), (n - t, n)]
        else:
            ranges.append((p, p + r))
        keep.append(_merged(ranges))
    f.keep = keep


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-empty ranges, adjacent ones joined (a whole sequence stays one range: see gather)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
