"""Weighted and long prompts, in riffusion-hobby's syntax (that of the diffusers community pipeline
"lpw_stable_diffusion" it embeds).

Syntax: `(text:1.5)` multiplies the weight of text's tokens by 1.5, `(text)` by 1.1, `[text]` divides
it by 1.1; brackets nest (weights multiply); `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal brackets
and backslash. A bracket left open weighs everything after it; a closing bracket with none open is
text. riffusion-app's sample prompt "(caribbean:1.5) (jazz:0.3)" weighs caribbean 1.5, jazz 0.3.

Long prompts: up to MAX_CHUNKS x 75 tokens. The tokens are cut into chunks of 75, each encoded as its
own 77-token sequence (start token, 75 tokens, end token; the last chunk padded as the tokenizer pads),
and the encodings are concatenated: 77, 154 or 231 positions. Tokens past MAX_CHUNKS x 75 are dropped.
Prompts that are used together (a prompt and its negative, the two ends of an interpolation) get the
same number of chunks, the shorter ones padded with empty chunks.

Weighting: every position's embedding is multiplied by its token's weight, then the whole embedding is
rescaled so that its mean is what it was unweighted (as riffusion-hobby does). Prompts without weights
give exactly the plain 77-token embedding.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK_TOKENS = 75  # a 77-position CLIP sequence less its start and end tokens
MAX_CHUNKS = 3
BRACKET_WEIGHT = 1.1


def parse(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt, neighbours of equal weight merged; [("", 1.0)] for an empty one."""
    pieces: list[list] = []
    round_open: list[int] = []  # index in pieces where each open "(" starts
    square_open: list[int] = []
    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\":
            if i + 1 < len(prompt) and prompt[i + 1] in "()[]\\":
                pieces.append([prompt[i + 1], 1.0])
                i += 1
        elif char == "(":
            round_open.append(len(pieces))
        elif char == "[":
            square_open.append(len(pieces))
        elif char == ")" and round_open:
            _scale(pieces, round_open.pop(), BRACKET_WEIGHT)
        elif char == "]" and square_open:
            _scale(pieces, square_open.pop(), 1 / BRACKET_WEIGHT)
        elif char == ":" and round_open and (weighted := _weight_and_close(prompt, i + 1)):
            weight, i = weighted
            _scale(pieces, round_open.pop(), weight)
            continue
        else:
            pieces.append([char, 1.0])
        i += 1
    for start in round_open:
        _scale(pieces, start, BRACKET_WEIGHT)
    for start in square_open:
        _scale(pieces, start, 1 / BRACKET_WEIGHT)
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def _scale(pieces: list[list], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece[1] *= factor


def _weight_and_close(prompt: str, start: int) -> tuple[float, int] | None:
    """(weight, index after the ")") when prompt[start:] begins with a number and ")", else None."""
    end = prompt.find(")", start)
    if end < 0:
        return None
    number = prompt[start:end]
    if not number or any(c not in "+-.0123456789" for c in number):
        return None
    try:
        weight = float(number)
    except ValueError:
        return None
    return weight, end + 1


def tokens_and_weights(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (no start or end token) and their weights, cut at MAX_CHUNKS x CHUNK_TOKENS."""
    ids: list[int] = []
    weights: list[float] = []
    limit = MAX_CHUNKS * CHUNK_TOKENS
    for text, weight in parse(prompt):
        piece = tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit).input_ids
        ids += piece
        weights += [weight] * len(piece)
        if len(ids) >= limit:
            break
    return ids[:limit], weights[:limit]


def chunked_ids(tokenizer, ids: list[int], chunks: int) -> np.ndarray:
    """[chunks, 77] int64: each chunk is start token, up to 75 ids, end token, padding."""
    rows = []
    for chunk in range(chunks):
        content = ids[chunk * CHUNK_TOKENS:(chunk + 1) * CHUNK_TOKENS]
        row = [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (CHUNK_TOKENS + 2 - len(row)))
    return np.array(rows, dtype=np.int64)


def chunked_weights(weights: list[float], chunks: int) -> np.ndarray:
    """[chunks * 77] float32: each token's weight at its position, 1 for start, end and padding."""
    out = np.ones((chunks, CHUNK_TOKENS + 2), dtype=np.float32)
    for chunk in range(chunks):
        content = weights[chunk * CHUNK_TOKENS:(chunk + 1) * CHUNK_TOKENS]
        out[chunk, 1:1 + len(content)] = content
    return out.reshape(-1)


def encode(tokenizer, text_encoder, prompts: list[str]) -> np.ndarray:
    """[len(prompts), chunks * 77, hidden] float32 embeddings of the prompts, all with one chunk count.

    text_encoder: called on int64 ids [n, 77] (a paddle tensor), returns a sequence whose first item is
    the last hidden state (ppdiffusers' CLIPTextModel and export.runtime's TextEncoderRuntime both do).
    """
    import paddle

    parsed = [tokens_and_weights(tokenizer, prompt) for prompt in prompts]
    chunks = max(1, *(math.ceil(len(ids) / CHUNK_TOKENS) for ids, _ in parsed))
    ids = np.concatenate([chunked_ids(tokenizer, prompt_ids, chunks) for prompt_ids, _ in parsed])
    hidden = np.asarray(text_encoder(paddle.to_tensor(ids))[0].numpy(), dtype=np.float32)
    embeddings = hidden.reshape(len(prompts), chunks * (CHUNK_TOKENS + 2), hidden.shape[-1])
    for embedding, (_, weights) in zip(embeddings, parsed):
        if any(weight != 1.0 for weight in weights):
            _weigh(embedding, chunked_weights(weights, chunks))
    return embeddings


def _weigh(embedding: np.ndarray, weights: np.ndarray) -> None:
    """In place: each position times its weight, then the whole rescaled to its unweighted mean."""
    before = embedding.mean(dtype=np.float64)
    embedding *= weights[:, None]
    after = embedding.mean(dtype=np.float64)
    if not (np.isfinite(after) and after != 0):
        raise ValueError(f"prompt weights {sorted(set(weights.tolist()))} leave no usable embedding")
    embedding *= np.float32(before / after)
