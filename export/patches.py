"""What tracing needs: export wrappers around the ppdiffusers models, and the layer swaps made while tracing.

The dynamic models cannot be traced as they are with dynamic batch, height and width
(found tracing ppdiffusers 0.29 on Paddle 3.3):

- `UNet2DConditionModel.forward` decides in Python whether to pass explicit upsampling sizes
  (`if any(s % default_overall_up_factor != 0 ...)`), which needs concrete sizes. `UNetForExport`
  runs the same blocks and always passes each upsampler the size of the skip connection it is
  concatenated with, so every height and width (odd ones too) gives the dynamic model's result.
- `Upsample2D` calls `F.interpolate(scale_factor=2.0)`, a `nearest_interp` op whose f64 `scale`
  attribute Paddle Inference with oneDNN and paddle2onnx refuse; the op keeps an (empty) f64
  array attribute even with an explicit size. `NearestUpsample` does the same nearest-neighbour
  resize as an index `gather` per axis, with its output size explicit (the skip connection's, or
  twice the input), so the program holds no `nearest_interp` at all.
- Paddle Inference 3.3 with oneDNN runs some unary ops (sin, cos, silu) in place even when their
  input has other readers (the PIR inplace pass; `FLAGS_pir_apply_inplace_pass=0` avoids it, and
  export/runtime.py sets it). The sinusoidal timestep embedding feeds one tensor to both cos and sin,
  so a program run with the default flags got cos(x) where sin(x) was meant (UNet off by 0.075 on
  the tiny model). `SinusoidalTimesteps` gives cos and sin their own, bit-identical, inputs.
- paddle2onnx 2.1.0 converts group_norm on 4-D inputs only, and the VAE's attention normalises a
  [batch, channels, tokens] tensor. `GroupNorm4D` runs the same GroupNorm on [batch, channels,
  tokens, 1].
- Paddle Inference materialises each [batch, heads, tokens, tokens] score matrix of a plain
  attention (full UNet, batch 2, 64x64 latents: 4096 tokens, most of a step's time).
  `FusableSelfAttention` writes self-attention as the op sequence oneDNN's `self_attention_fuse_pass`
  turns into `self_dp_attention`, a blocked kernel that never holds the whole score matrix.
- CLIP's text transformer reads `input_ids.shape` as Python ints (`-1` once traced) for its causal
  mask, position ids, pooling index and the attention's reshapes. `TextEncoderForExport` and
  `ShapeFreeCLIPAttention` compute the same thing from shape tensors.

The swaps live only inside `export_patches()`; outside it the model is the unmodified dynamic one
that exports are validated against.
"""

from __future__ import annotations

import contextlib
import math

import paddle
import paddle.nn.functional as F
from paddle import nn

from export.errors import ExportError


def nearest_resize(x: paddle.Tensor, size) -> paddle.Tensor:
    """Nearest-neighbour resize of an NCHW tensor to `size` = (height, width) (ints or a shape tensor).

    Output index i reads input index floor(i * in / out): what `F.interpolate(mode="nearest")` and
    torch's `nearest` compute, in integer arithmetic.
    """
    shape = paddle.shape(x)
    for axis in (2, 3):
        size_in, size_out = shape[axis].astype("int64"), size[axis - 2]
        size_out = paddle.to_tensor(size_out, dtype="int64") if isinstance(size_out, int) else size_out.astype("int64")
        index = paddle.arange(size_out, dtype="int64") * size_in // size_out
        x = paddle.gather(x, index, axis=axis)
    return x


class NearestUpsample(nn.Layer):
    """Stands in for a ppdiffusers `Upsample2D` while tracing: same conv, no `nearest_interp` op."""

    def __init__(self, original):
        super().__init__()
        if getattr(original, "use_conv_transpose", False):
            raise ExportError("Upsample2D with a transposed convolution is not supported by the export")
        if getattr(original, "data_format", "NCHW") != "NCHW":
            raise ExportError("only NCHW models can be exported")
        self.conv = (original.conv if original.name == "conv" else original.Conv2d_0) if original.use_conv else None

    def forward(self, hidden_states, output_size=None, scale: float = 1.0):
        if output_size is None:
            output_size = paddle.shape(hidden_states)[2:] * 2
        hidden_states = nearest_resize(hidden_states, output_size)
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states


class ShapeFreeCLIPAttention(nn.Layer):
    """Stands in for ppdiffusers' `CLIPAttention` while tracing: reshapes keep the batch and sequence
    dimensions (0 = copy) instead of baking in `hidden_states.shape`; the same operations in the same order."""

    def __init__(self, original):
        super().__init__()
        self.inner = original

    def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False):
        inner = self.inner

        def heads(tensor):
            return tensor.reshape([0, 0, inner.num_heads, inner.head_dim]).transpose([0, 2, 1, 3])

        query = heads(inner.q_proj(hidden_states) * inner.scale)
        key = heads(inner.k_proj(hidden_states))
        value = heads(inner.v_proj(hidden_states))
        weights = paddle.matmul(query, key, transpose_y=True)  # [batch, heads, tokens, tokens]
        if causal_attention_mask is not None:
            weights = weights + causal_attention_mask
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = F.softmax(weights, axis=-1)
        output = paddle.matmul(weights, value).transpose([0, 2, 1, 3]).reshape([0, 0, inner.embed_dim])
        return inner.out_proj(output), None


class FusableSelfAttention(nn.Layer):
    """Stands in for a ppdiffusers `Attention` run by the plain `AttnProcessor` while tracing.

    Self-attention becomes the pattern of Paddle Inference's oneDNN `self_attention_fuse_pass`: one
    projection to [batch, tokens, 3, heads, head_dim], transposed and sliced into q, k and v, k
    transposed by an op of its own, matmul, softmax, matmul, transpose. The fused op takes no softmax
    scale, so it is folded into the query weights. The output is flattened rather than reshaped: an
    earlier pass would fuse a reshape there with the last matmul, and the pattern would no longer match.
    Cross-attention (encoder states or a mask given) runs the original layer.
    """

    def __init__(self, original):
        super().__init__()
        self.inner = original

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        attn = self.inner
        if encoder_hidden_states is not None or attention_mask is not None:
            return attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                        **kwargs)
        residual = hidden_states
        images = hidden_states.ndim == 4
        if images:
            hidden_states = hidden_states.flatten(2).transpose([0, 2, 1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose([0, 2, 1])).transpose([0, 2, 1])
        q, k, v = attn.to_q, attn.to_k, attn.to_v
        weight = paddle.concat([q.weight * attn.scale, k.weight, v.weight], axis=1)
        bias = None if q.bias is None else paddle.concat([q.bias * attn.scale, k.bias, v.bias])
        qkv = F.linear(hidden_states, weight, bias).reshape([0, 0, 3, attn.heads, attn.head_dim])
        qkv = qkv.transpose([2, 0, 3, 1, 4])
        weights = F.softmax(paddle.matmul(qkv[0], qkv[1].transpose([0, 1, 3, 2])), axis=-1)
        hidden_states = paddle.matmul(weights, qkv[2]).transpose([0, 2, 1, 3]).flatten(2)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if images:
            hidden_states = hidden_states.transpose([0, 2, 1]).reshape(paddle.shape(residual))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _fusable(layer) -> bool:
    """A ppdiffusers `Attention` whose self-attention `FusableSelfAttention` computes: the plain processor,
    no spatial norm, q/k/v projections that are plain linear layers (no LoRA), all with or all without bias."""
    from ppdiffusers.models.attention_processor import Attention, AttnProcessor

    if not isinstance(layer, Attention) or type(layer.processor) is not AttnProcessor or layer.spatial_norm is not None:
        return False
    projections = (layer.to_q, layer.to_k, layer.to_v)
    return (all(getattr(item, "lora_layer", None) is None for item in projections)
            and len({item.bias is None for item in projections}) == 1)


class GroupNorm4D(nn.Layer):
    """Stands in for a `paddle.nn.GroupNorm`: 3-D inputs get a trailing axis of 1 for the op."""

    def __init__(self, original):
        super().__init__()
        self.inner = original

    def forward(self, x):
        if len(x.shape) == 3:
            return self.inner(x.unsqueeze(-1)).squeeze(-1)
        return self.inner(x)


class SinusoidalTimesteps(nn.Layer):
    """Stands in for ppdiffusers' `Timesteps`: the same embedding as `get_timestep_embedding`, in the
    same float32 operations, with cos and sin reading separate (equal) tensors."""

    def __init__(self, original):
        super().__init__()
        self.num_channels = original.num_channels
        self.flip_sin_to_cos = original.flip_sin_to_cos
        self.downscale_freq_shift = original.downscale_freq_shift

    def forward(self, timesteps):
        half = self.num_channels // 2
        exponent = -math.log(10000) * paddle.arange(start=0, end=half, dtype="float32")
        frequencies = paddle.exp(exponent / (half - self.downscale_freq_shift))
        steps = timesteps[:, None].astype("float32")
        sin = paddle.sin(steps * frequencies[None, :])
        cos = paddle.cos(frequencies[None, :] * steps)  # x*y == y*x bit for bit, but a tensor of its own
        halves = [cos, sin] if self.flip_sin_to_cos else [sin, cos]
        if self.num_channels % 2 == 1:
            halves.append(paddle.zeros_like(sin[:, :1]))
        return paddle.concat(halves, axis=-1)


def _swap(model: nn.Layer, wanted, factory, swapped: list) -> None:
    for name, child in list(model.named_children()):
        if wanted(child):
            replacement = factory(child)
            model._sub_layers[name] = replacement
            swapped.append((model, name, child))
        else:
            _swap(child, wanted, factory, swapped)


@contextlib.contextmanager
def export_patches(model: nn.Layer):
    """Swap the layers tracing cannot take for their export stand-ins; restore them on exit."""
    from ppdiffusers.models.embeddings import Timesteps
    from ppdiffusers.models.resnet import Upsample2D
    from ppdiffusers.transformers.clip.modeling import CLIPAttention

    swapped: list = []
    try:
        _swap(model, lambda layer: isinstance(layer, Upsample2D), NearestUpsample, swapped)
        _swap(model, lambda layer: isinstance(layer, CLIPAttention), ShapeFreeCLIPAttention, swapped)
        _swap(model, _fusable, FusableSelfAttention, swapped)
        _swap(model, lambda layer: isinstance(layer, Timesteps), SinusoidalTimesteps, swapped)
        _swap(model, lambda layer: isinstance(layer, nn.GroupNorm), GroupNorm4D, swapped)
        yield model
    finally:
        for parent, name, original in reversed(swapped):
            parent._sub_layers[name] = original


# --- the exported entry points -------------------------------------------------------------------

UNSUPPORTED_UNET = {
    # config key: value the export supports (SD 1.x / 2.x style text-conditioned UNets)
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
}


class UNetForExport(nn.Layer):
    """(sample, timestep, encoder_hidden_states) -> noise prediction, shape-agnostic.

    The blocks of `UNet2DConditionModel.forward` for text-conditioned UNets, with every upsampler
    told the size of the skip connection that follows it. `timestep` is float32 of shape [1]
    (one step for the whole batch) or [batch].
    """

    def __init__(self, unet):
        super().__init__()
        config = unet.config
        for key, supported in UNSUPPORTED_UNET.items():
            if config.get(key, supported) != supported:
                raise ExportError(f"unet/config.json: {key}={config.get(key)!r} is not supported by the export")
        if getattr(unet, "data_format", "NCHW") != "NCHW":
            raise ExportError("unet: only NCHW models can be exported")
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timestep.astype("float32").expand([paddle.shape(sample)[0]])
        emb = unet.time_embedding(unet.time_proj(timesteps).astype(sample.dtype), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)

        hidden = unet.conv_in(sample)
        skips = (hidden,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, residuals = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, residuals = block(hidden_states=hidden, temb=emb)
            skips += residuals

        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden = unet.mid_block(hidden, emb)

        last = len(unet.up_blocks) - 1
        for i, block in enumerate(unet.up_blocks):
            count = len(block.resnets)
            residuals, skips = skips[-count:], skips[:-count]
            size = paddle.shape(skips[-1])[2:] if i < last else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals,
                               encoder_hidden_states=encoder_hidden_states, upsample_size=size)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals, upsample_size=size)

        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class VaeEncoderForExport(nn.Layer):
    """image in [-1, 1] -> the posterior's parameters (mean and log-variance, concatenated on channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class VaeDecoderForExport(nn.Layer):
    """scaled-back latents -> image in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        if self.vae.post_quant_conv is not None:
            latent_sample = self.vae.post_quant_conv(latent_sample)
        return self.vae.decoder(latent_sample)


class TextEncoderForExport(nn.Layer):
    """input_ids -> (last_hidden_state, pooler_output) of a CLIP text model, any batch and length."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        model = self.text_encoder.text_model
        length = paddle.shape(input_ids)[1]
        positions = paddle.arange(length, dtype="int64").unsqueeze(0)
        hidden = model.embeddings(input_ids=input_ids, position_ids=positions)
        # CLIP's causal mask: the dtype's minimum above the diagonal, 0 on and below it.
        above = (positions > positions.transpose([1, 0])).astype(hidden.dtype)  # [length, length], query x key
        causal = (above * paddle.finfo(hidden.dtype).min).unsqueeze([0, 1])
        hidden = model.encoder(inputs_embeds=hidden, causal_attention_mask=causal, return_dict=False)[0]
        hidden = model.final_layer_norm(hidden)
        if model.eos_token_id == 2:
            # legacy CLIP configs: the end-of-text token has the highest id in each sequence
            eos = input_ids.astype("int32").argmax(axis=-1)
        else:
            eos = (input_ids == model.eos_token_id).astype("int32").argmax(axis=-1)
        rows = paddle.arange(paddle.shape(input_ids)[0], dtype="int64")
        pooled = hidden.gather_nd(paddle.stack([rows, eos.astype("int64")], axis=-1))
        return hidden, pooled
