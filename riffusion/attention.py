"""Blockwise attention for training on the CPU: the UNet's attention computed in blocks of query rows and
heads, with a backward pass that recomputes each block's probabilities instead of keeping them.

Why: ppdiffusers' AttnProcessor materialises the scores, their softmax and its gradient for all heads at
once; at the full-size UNet's 64x64 self-attention (4096 tokens x 8 heads) each is 537 MB, and autograd
keeps the probabilities of all five such layers (2.7 GB) until backward. Here only q, k, v, the output
and each row's log-sum-exp are kept (the FlashAttention recipe, done with matmuls), and at most
BLOCK_ELEMENTS scores exist at a time. The softmax is written as exp(s - max) / sum, the same function
as F.softmax up to float rounding (tests/test_train_attention.py bounds the difference).

Block size, measured on the 2-core AMD EPYC here (Paddle 3.3.1 eager, riffusion.train.tune_cpu_runtime
applied, one attention layer forward + backward at 4096 tokens x 8 heads x 40): AttnProcessor 2.42 s;
blocks of 2M scores 3.6 s, 8M 2.49 s, 16M 2.22 s, 32M 2.59 s. Small blocks lose to per-op overhead and
the backward's recomputed matmul; 16M (one head of a 4096-token attention) costs no time.
"""

from __future__ import annotations

import paddle

BLOCK_ELEMENTS = 2**24  # scores per block: 64 MB of float32


def _blocks(heads: int, rows: int, keys: int, budget: int):
    """(head slice, row slice) pairs covering [heads, rows] with at most `budget` scores each."""
    rows_per_block = max(1, min(rows, budget // keys))
    heads_per_block = max(1, budget // (rows_per_block * keys)) if rows_per_block == rows else 1
    for h in range(0, heads, heads_per_block):
        for r in range(0, rows, rows_per_block):
            yield slice(h, min(h + heads_per_block, heads)), slice(r, min(r + rows_per_block, rows))


def _stitch(parts: dict) -> paddle.Tensor:
    """Concatenate {(head start, row start): block} back into [heads, rows, ...]."""
    by_head = {}
    for (h, r), block in sorted(parts.items()):
        by_head.setdefault(h, []).append(block)
    groups = [paddle.concat(blocks, axis=1) if len(blocks) > 1 else blocks[0] for blocks in by_head.values()]
    return paddle.concat(groups, axis=0) if len(groups) > 1 else groups[0]


class _BlockAttention(paddle.autograd.PyLayer):
    """softmax(q k^T) v on [heads, tokens, dim] tensors; q arrives already scaled."""

    @staticmethod
    def forward(ctx, query, key, value, budget):
        heads, rows, keys = query.shape[0], query.shape[1], key.shape[1]
        outs, lses = {}, {}
        for h, r in _blocks(heads, rows, keys, budget):
            scores = paddle.matmul(query[h, r], key[h], transpose_y=True)
            peak = scores.max(axis=-1, keepdim=True)
            scores.subtract_(peak)
            scores.exp_()
            total = scores.sum(axis=-1, keepdim=True)
            outs[h.start, r.start] = paddle.matmul(scores, value[h]) / total
            lses[h.start, r.start] = peak + paddle.log(total)
        out = _stitch(outs)
        ctx.budget = budget
        ctx.save_for_backward(query, key, value, out, _stitch(lses))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensor()
        heads, rows, keys = query.shape[0], query.shape[1], key.shape[1]
        delta = (grad_out * out).sum(axis=-1, keepdim=True)  # rowsum(dP * P) of the softmax gradient
        grad_q, grad_k, grad_v = {}, {}, {}
        for h, r in _blocks(heads, rows, keys, ctx.budget):
            q, g = query[h, r], grad_out[h, r]
            probs = paddle.matmul(q, key[h], transpose_y=True)
            probs.subtract_(lse[h, r])
            probs.exp_()
            dv = paddle.matmul(probs, g, transpose_x=True)
            dscores = paddle.matmul(g, value[h], transpose_y=True)
            dscores.subtract_(delta[h, r])
            dscores.multiply_(probs)
            grad_q[h.start, r.start] = paddle.matmul(dscores, key[h])
            dk = paddle.matmul(dscores, q, transpose_x=True)
            if h.start in grad_k:
                grad_k[h.start].add_(dk)
                grad_v[h.start].add_(dv)
            else:
                grad_k[h.start], grad_v[h.start] = dk, dv
        return (_stitch(grad_q), _stitch({(h, 0): t for h, t in grad_k.items()}),
                _stitch({(h, 0): t for h, t in grad_v.items()}))


def block_attention(query, key, value, scale: float, budget: int | None = None):
    """softmax(scale * q k^T) v for [batch * heads, tokens, head dim] tensors, differentiable; blocks of at
    most `budget` scores (default BLOCK_ELEMENTS)."""
    return _BlockAttention.apply(query * scale, key, value, budget or BLOCK_ELEMENTS)


class BlockwiseAttnProcessor:
    """ppdiffusers' AttnProcessor (the default on CPU) with the attention core replaced by block_attention.
    A call with an attention mask goes to AttnProcessor unchanged."""

    def __init__(self, budget: int | None = None):
        from ppdiffusers.models.attention_processor import AttnProcessor

        self.budget = budget
        self.fallback = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, **kwargs):
        from ppdiffusers.utils import USE_PEFT_BACKEND

        if attention_mask is not None or attn.spatial_norm is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale, **kwargs)
        args = () if USE_PEFT_BACKEND else (scale,)  # as AttnProcessor passes the LoRA scale
        residual = hidden_states
        image = hidden_states.ndim == 4
        if image:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape([batch, channels, height * width]).transpose([0, 2, 1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose([0, 2, 1])).transpose([0, 2, 1])
        query = attn.to_q(hidden_states, *args)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states, *args)
        value = attn.to_v(encoder_hidden_states, *args)
        query, key, value = (attn.head_to_batch_dim(t, out_dim=3) for t in (query, key, value))
        hidden_states = block_attention(query, key, value, attn.scale, self.budget)
        hidden_states = attn.batch_to_head_dim(hidden_states, in_dim=3)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states, *args))
        if image:
            hidden_states = hidden_states.transpose([0, 2, 1]).reshape([batch, channels, height, width])
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_blockwise_attention(unet, budget: int | None = None) -> None:
    """Give every attention layer of the UNet the blockwise processor (LoRA layers stay attached). Set layer
    by layer: unet.set_attn_processor first reads unet.attn_processors, which fails once a LoRA'd layer has
    a processor ppdiffusers does not know (it looks for a "LoRA" + class name variant)."""
    from ppdiffusers.models.attention_processor import Attention

    processor = BlockwiseAttnProcessor(budget)
    for _, layer in unet.named_sublayers():
        if isinstance(layer, Attention):
            layer.set_processor(processor)
