"""Tensor names of the original Stable Diffusion (LDM) single-file checkpoint, from the configs.

The block numbering follows how the original code builds the model (ldm's openaimodel.py numbers
input_blocks in the order it appends them: for n layers per level, block j of level i is
input_blocks.{(n+1)i+j+1}, each level's downsampler the next number), so the
tables below are generated for any depth, not written out for SD1 only. Each table maps a diffusers
block prefix to (LDM block prefix, renames of the sub-layers inside that block).
"""

from __future__ import annotations

from convert.errors import ConversionError
from convert.tensorfile import SourceTensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Blocks = dict[str, tuple[str, dict[str, str]]]


def unet_blocks(config: dict) -> Blocks:
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    blocks: Blocks = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
    }
    for i in range(levels):
        for j in range(n):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{(n + 1) * i + j + 1}.0", UNET_RESNET)
            blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{(n + 1) * i + j + 1}.1", {})
        for j in range(n + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{(n + 1) * i + j}.0", UNET_RESNET)
            blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{(n + 1) * i + j}.1", {})
        if i < levels - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(n + 1) * (i + 1)}.0.op", {})
            upsampler_slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{(n + 1) * i + n}.{upsampler_slot}.conv", {})
    return _prefixed(blocks, UNET_PREFIX)


def vae_blocks(config: dict) -> Blocks:
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    blocks: Blocks = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for side in ("encoder", "decoder"):
        blocks[f"{side}.conv_in"] = (f"{side}.conv_in", {})
        blocks[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", VAE_RESNET)
        blocks[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", VAE_ATTENTION)
        blocks[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", VAE_RESNET)
        blocks[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        blocks[f"{side}.conv_out"] = (f"{side}.conv_out", {})
    for i in range(levels):
        for j in range(n):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(n + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET)
        if i < levels - 1:
            blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{levels - 1 - i}.upsample.conv", {})
    return _prefixed(blocks, VAE_PREFIX)


def is_vae_attention_weight(ldm_name: str) -> bool:
    """q/k/v/proj_out of the VAE mid-block attention: 1x1 conv weights [C, C, 1, 1] in the LDM file,
    linear weights [C, C] in diffusers."""
    return ldm_name.startswith(VAE_PREFIX) and ".mid.attn_1." in ldm_name and ldm_name.endswith(
        ("q.weight", "k.weight", "v.weight", "proj_out.weight"))


class NameMap:
    """Rename tensors between the diffusers and the LDM layouts, in either direction."""

    def __init__(self, blocks: Blocks):
        self.forward = blocks
        self.backward = {ldm: (diffusers, {v: k for k, v in inner.items()}) for diffusers, (ldm, inner) in blocks.items()}

    def to_ldm(self, name: str) -> str | None:
        return _rename(name, self.forward)

    def from_ldm(self, name: str) -> str | None:
        return _rename(name, self.backward)


def _rename(name: str, blocks: Blocks) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        block = blocks.get(".".join(parts[:cut]))
        if block is None:
            continue
        target, inner = block
        rest, leaf = ".".join(parts[cut:-1]), parts[-1]
        rest = inner.get(rest, rest)
        return ".".join(piece for piece in (target, rest, leaf) if piece)
    return None


def _prefixed(blocks: Blocks, prefix: str) -> Blocks:
    return {diffusers: (prefix + ldm, inner) for diffusers, (ldm, inner) in blocks.items()}


# Keys of training checkpoints that are not model weights: the noise schedule the original code
# registers as buffers, and its learned-variance placeholder.
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
}
EMA_PREFIX = "model_ema."
OTHER_ARCHITECTURES = {
    "conditioner.embedders.": "SDXL (two text encoders under conditioner.embedders)",
    "cond_stage_model.model.": "Stable Diffusion 2.x (OpenCLIP text encoder under cond_stage_model.model)",
}


class SingleFileSource:
    """A single-file LDM checkpoint seen as the parts of a diffusers folder."""

    def __init__(self, file, ema: bool):
        self.file = file
        self.ema = ema
        self.used: set[str] = set()
        names = list(file.shapes)
        for prefix, architecture in OTHER_ARCHITECTURES.items():
            if any(name.startswith(prefix) for name in names):
                raise ConversionError(f"{file.path}: a {architecture} checkpoint; only Stable Diffusion 1.x is supported")
        for prefix in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX):
            if not any(name.startswith(prefix) for name in names):
                raise ConversionError(f"{file.path}: no {prefix}* tensors, not a Stable Diffusion 1.x checkpoint")
        if ema and not any(name.startswith(EMA_PREFIX) for name in names):
            raise ConversionError(f"{file.path}: --ema given but the checkpoint holds no {EMA_PREFIX}* weights")

    def tensors(self, part: str, config: dict) -> list:
        if part == "text_encoder":
            chosen = [(name, "text_model." + name[len(TEXT_PREFIX):].removeprefix("text_model.")) for name in self.file.shapes
                      if name.startswith(TEXT_PREFIX)]
        else:
            names = NameMap(unet_blocks(config) if part == "unet" else vae_blocks(config))
            prefix = UNET_PREFIX if part == "unet" else VAE_PREFIX
            chosen = []
            for name in self.file.shapes:
                if not name.startswith(prefix):
                    continue
                diffusers_name = names.from_ldm(name)
                if diffusers_name is None:
                    raise ConversionError(f"{self.file.path}: tensor {name!r}: unknown tensor for this {part} config")
                chosen.append((self._ema_name(name) if part == "unet" else name, diffusers_name))
        self.used.update(file_name for file_name, _ in chosen)
        return [SourceTensor(self.file, file_name, name, squeeze=is_vae_attention_weight(file_name) and
                             len(self.file.shapes[file_name]) == 4) for file_name, name in chosen]

    def _ema_name(self, name: str) -> str:
        """LDM keeps EMA copies as model_ema.<name after 'model.' with its dots removed>."""
        if not self.ema:
            return name
        ema_name = EMA_PREFIX + name[len("model."):].replace(".", "")
        if ema_name not in self.file.shapes:
            raise ConversionError(f"{self.file.path}: tensor {name!r} has no EMA copy {ema_name!r}")
        return ema_name

    def dropped(self) -> list[str]:
        """The keys no part took; fails on any that is not a known non-weight entry."""
        left = [name for name in self.file.shapes if name not in self.used]
        for name in left:
            known = (name in SCHEDULE_BUFFERS or name.startswith(EMA_PREFIX)
                     or (self.ema and name.startswith(UNET_PREFIX)))  # the non-EMA UNet, when EMA was taken
            if not known:
                raise ConversionError(f"{self.file.path}: tensor {name!r}: unknown key")
        return left


def original_config(unet: dict, vae: dict, scheduler: dict) -> dict:
    """The original code's model config (v1-inference.yaml) for these diffusers configs: what
    ppdiffusers' and diffusers' from_single_file, and WebUI-style tools (as `<checkpoint>.yaml`), read."""
    unet_channels = unet["block_out_channels"]
    vae_channels = vae["block_out_channels"]
    attention_levels = [2**i for i, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind]
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": scheduler["beta_start"], "linear_end": scheduler["beta_end"],
            "timesteps": scheduler["num_train_timesteps"], "num_timesteps_cond": 1, "log_every_t": 200,
            "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": unet["sample_size"],
            "channels": unet["in_channels"], "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": vae.get("scaling_factor", 0.18215), "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": unet["sample_size"], "in_channels": unet["in_channels"],
                "out_channels": unet["out_channels"], "model_channels": unet_channels[0],
                "attention_resolutions": sorted(attention_levels, reverse=True),
                "num_res_blocks": unet["layers_per_block"],
                "channel_mult": [c // unet_channels[0] for c in unet_channels],
                "num_heads": unet["attention_head_dim"], "use_spatial_transformer": True,
                "transformer_depth": 1, "context_dim": unet["cross_attention_dim"], "use_checkpoint": True,
                "legacy": False,
            }},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": vae["latent_channels"], "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True, "z_channels": vae["latent_channels"], "resolution": 256,
                    "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae_channels[0],
                    "ch_mult": [c // vae_channels[0] for c in vae_channels],
                    "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            }},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        },
    }}


def configs_from_original(data: dict) -> tuple[dict, dict, dict]:
    """The diffusers config keys (unet, vae, scheduler) an original config fixes: the inverse of
    `original_config`."""
    params = data["model"]["params"]
    unet = params["unet_config"]["params"]
    levels = [unet["model_channels"] * mult for mult in unet["channel_mult"]]
    attention = [2**level in unet["attention_resolutions"] for level in range(len(levels))]
    down = ["CrossAttnDownBlock2D" if on else "DownBlock2D" for on in attention]
    vae = params["first_stage_config"]["params"]["ddconfig"]
    return (
        {"sample_size": unet["image_size"], "in_channels": unet["in_channels"], "out_channels": unet["out_channels"],
         "block_out_channels": levels, "layers_per_block": unet["num_res_blocks"],
         "attention_head_dim": unet["num_heads"], "cross_attention_dim": unet["context_dim"],
         "down_block_types": down, "up_block_types": [kind.replace("Down", "Up") for kind in reversed(down)]},
        {"block_out_channels": [vae["ch"] * mult for mult in vae["ch_mult"]], "layers_per_block": vae["num_res_blocks"],
         "latent_channels": vae["z_channels"], "in_channels": vae["in_channels"], "out_channels": vae["out_ch"],
         "down_block_types": ["DownEncoderBlock2D"] * len(vae["ch_mult"]),
         "up_block_types": ["UpDecoderBlock2D"] * len(vae["ch_mult"])},
        {"beta_start": params["linear_start"], "beta_end": params["linear_end"],
         "num_train_timesteps": params["timesteps"]},
    )


CLIP_HEAD_SIZE = 64  # every CLIP text encoder (ViT-B and ViT-L) splits its width into heads of 64


def text_config_from_shapes(file) -> dict:
    """The CLIP text encoder's sizes read off its tensors; the head count is width / 64, CLIP's head size."""
    shapes = {name.removeprefix(TEXT_PREFIX).removeprefix("text_model."): shape for name, shape in file.shapes.items()
              if name.startswith(TEXT_PREFIX)}
    vocab, width = shapes["embeddings.token_embedding.weight"]
    layers = {int(name.split(".")[2]) for name in shapes if name.startswith("encoder.layers.")}
    if width % CLIP_HEAD_SIZE:
        raise ConversionError(f"{file.path}: a {width}-wide text encoder is not a CLIP one (heads of "
                              f"{CLIP_HEAD_SIZE}); pass --config with the diffusers folder or Hub id it was made from")
    return {"vocab_size": vocab, "hidden_size": width, "num_attention_heads": width // CLIP_HEAD_SIZE,
            "num_hidden_layers": len(layers), "intermediate_size": shapes["encoder.layers.0.mlp.fc1.weight"][0],
            "max_position_embeddings": shapes["embeddings.position_embedding.weight"][0]}
