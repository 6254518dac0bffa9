"""python -m riffusion.train: fine-tune a converted Riffusion library on a spectrogram dataset, on Paddle.

LoRA by default (adapters on the UNet's attention projections, --targets), --full for the whole UNet,
--train-text-encoder for the text encoder too (LoRA on its attention projections, or all of it with
--full). The loss is latent diffusion's: VAE latents of the images, noise added at a uniformly drawn
timestep by a DDPM scheduler built from the library's own scheduler config (same betas), the UNet's
prediction (epsilon, or v for a v-prediction library) against the truth, mean squared error. Captions go
through the library's tokenizer. No augmentation: flipping or cropping a spectrogram changes what it
sounds like (time runs left to right, pitch bottom to top), so every image is used as it is.

Every random draw of a step is a function of (--seed, sample position) alone: which clip (a seeded
permutation per epoch), the latent sample, the noise and the timestep. So --resume from a checkpoint, a
different --grad-accum, or `python -m paddle.distributed.launch --nproc_per_node N -m riffusion.train` (data
parallel: each process takes its share of the global batch, gradients are averaged with Paddle's
all_reduce) reproduce the same sequence of global batches.

RUN holds train_config.json, log.jsonl (one line per step: step, loss, lr), checkpoints/step-NNNNNNNN/
(trainable weights and optimizer state, each checkpoint renamed into place only when complete) and, at
the end, paddle_lora_weights.safetensors (LoRA) or a complete library (--full).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from riffusion.console import add_version, command, quiet_third_party
from riffusion.cpu_tuning import tune_cpu_runtime
from riffusion.errors import InputError

CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LIBRARY_PARTS = ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json")


@dataclass
class TrainConfig:
    checkpoint: str
    data: str
    rank: int = 4
    alpha: float | None = None  # None: rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    full: bool = False
    train_text_encoder: bool = False
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100

    def check(self) -> None:
        for name in ("lr", "weight_decay", "max_grad_norm") + (("alpha",) if self.alpha is not None else ()):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        limits = {"rank": 1024, "steps": 10**8, "batch_size": 4096, "grad_accum": 4096, "checkpoint_every": 10**8}
        for name, most in limits.items():
            value = getattr(self, name)
            least = 0 if name == "checkpoint_every" else 1
            if not least <= value <= most:
                raise InputError(f"--{name.replace('_', '-')} must be between {least} and {most}, got {value}")
        if not (Path(self.checkpoint) / "model_index.json").is_file():
            raise InputError(f"{self.checkpoint}: not a converted library (no model_index.json)")


class Trainer:
    """The model, data and optimizer of one process; `step(s)` runs global optimizer step s (0-based)."""

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1, quiet: bool = True,
                 attention: str = "blockwise"):
        """attention: "blockwise" (riffusion.attention: faster on the CPU, bounded memory) or "stock"
        (ppdiffusers' AttnProcessor, kept to measure against)."""
        import paddle
        from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

        from riffusion import lora
        from riffusion.dataset import read_rows

        self.config, self.rank, self.world = config, rank, world
        from export.runtime import cpu_count, use_all_cores

        use_all_cores(max(1, cpu_count() // world))  # `import paddle` leaves eager mode one thread
        library = Path(config.checkpoint)
        rows = read_rows(Path(config.data))
        paddle.seed(config.seed)
        load = dict(paddle_dtype=paddle.float32)
        self.unet = UNet2DConditionModel.from_pretrained(str(library / "unet"), **load)
        self.text_encoder = CLIPTextModel.from_pretrained(str(library / "text_encoder"), **load)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(library / "tokenizer"))
        vae = AutoencoderKL.from_pretrained(str(library / "vae"), **load)
        scheduler_config = json.loads((library / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        for model in (self.unet, self.text_encoder, vae):
            model.eval()  # SD has no dropout or batch norm in training use; eval keeps layers deterministic
            for parameter in model.parameters():
                parameter.stop_gradient = True

        self.unet_lora, self.text_lora = {}, {}
        if config.full:
            trainable = {f"unet.{name}": p for name, p in self.unet.named_parameters()}
            if config.train_text_encoder:
                trainable.update({f"text_encoder.{name}": p for name, p in self.text_encoder.named_parameters()})
        else:
            alpha = config.alpha if config.alpha is not None else float(config.rank)
            self.unet_lora = lora.add_unet_lora(self.unet, config.rank, alpha, config.targets, config.seed)
            if config.train_text_encoder:
                self.text_lora = lora.add_text_encoder_lora(self.text_encoder, config.rank, alpha, config.seed)
            trainable = {f"unet.{name}.{sub}": p for name, layer in self.unet_lora.items()
                         for sub, p in layer.named_parameters()}
            trainable.update({f"text_encoder.{name}.{sub}": p for name, layer in self.text_lora.items()
                              for sub, p in layer.named_parameters()})
        for parameter in trainable.values():
            parameter.stop_gradient = False
        self.trainable = trainable
        if attention == "blockwise":
            from riffusion.attention import use_blockwise_attention

            use_blockwise_attention(self.unet)
        elif attention != "stock":
            raise ValueError(f"attention must be 'blockwise' or 'stock', got {attention!r}")

        self.captions = [row["text"] for row in rows]
        self.latent_mean, self.latent_std = self._encode_images(vae, [Path(config.data) / row["file_name"] for row in rows], quiet)
        self.scaling = vae.config.get("scaling_factor", 0.18215)
        del vae
        self.text_ids = {caption: self._token_ids(caption) for caption in sorted(set(self.captions))}
        if not config.train_text_encoder:
            with paddle.no_grad():
                self.text_cache = {caption: self.text_encoder(ids)[0] for caption, ids in self.text_ids.items()}

        self.optimizer = paddle.optimizer.AdamW(
            learning_rate=config.lr, parameters=list(trainable.values()), weight_decay=config.weight_decay,
            grad_clip=paddle.nn.ClipGradByGlobalNorm(config.max_grad_norm) if config.max_grad_norm > 0 else None)

    def _encode_images(self, vae, paths: list[Path], quiet: bool):
        """Posterior mean and std of every image's VAE latent, computed once (the VAE is frozen)."""
        import paddle
        from PIL import Image
        from tqdm import tqdm

        means, stds = [], []
        sizes = set()
        with paddle.no_grad():
            for path in tqdm(paths, desc="encode images", unit="image", disable=quiet):
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
                sizes.add(array.shape)
                if len(sizes) > 1:
                    raise InputError(f"{path}: images differ in size ({sorted(sizes)}); make the dataset with one --clip-seconds")
                multiple = 8 * 2 ** (len(self.unet.config.block_out_channels) - 1)
                if array.shape[0] % multiple or array.shape[1] % multiple:
                    raise InputError(f"{path}: {array.shape[1]}x{array.shape[0]} is not a multiple of {multiple} "
                                     "pixels on each side")
                posterior = vae.encode(paddle.to_tensor(array.transpose(2, 0, 1)[None])).latent_dist
                means.append(posterior.mean.numpy()[0])
                stds.append(posterior.std.numpy()[0])
        return np.stack(means), np.stack(stds)

    def _token_ids(self, caption: str):
        tokenizer = self.tokenizer
        return tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pd").input_ids

    def _sample(self, position: int):
        """(clip index, latents, noise, timestep) of the global sample at `position` in the sample stream."""
        count = len(self.captions)
        epoch, offset = divmod(position, count)
        index = int(np.random.default_rng([self.config.seed, 1, epoch]).permutation(count)[offset])
        rng = np.random.default_rng([self.config.seed, 2, position])
        shape = self.latent_mean.shape[1:]
        latent = (self.latent_mean[index] + self.latent_std[index] * rng.standard_normal(shape, dtype=np.float32)) * np.float32(self.scaling)
        noise = rng.standard_normal(shape, dtype=np.float32)
        timestep = int(rng.integers(0, self.noise_scheduler.config.num_train_timesteps))
        return index, latent, noise, timestep

    def _micro_batch_loss(self, positions: list[int]):
        import paddle

        samples = [self._sample(position) for position in positions]
        latents = paddle.to_tensor(np.stack([sample[1] for sample in samples]))
        noise = paddle.to_tensor(np.stack([sample[2] for sample in samples]))
        timesteps = paddle.to_tensor([sample[3] for sample in samples], dtype="int64")
        captions = [self.captions[sample[0]] for sample in samples]
        if self.config.train_text_encoder:
            context = self.text_encoder(paddle.concat([self.text_ids[caption] for caption in captions]))[0]
        else:
            context = paddle.concat([self.text_cache[caption] for caption in captions])
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return paddle.nn.functional.mse_loss(prediction, target)

    def loss_at(self, positions: list[int]) -> float:
        """The loss on the given sample positions without training (fixed clips, noise and timesteps)."""
        import paddle

        with paddle.no_grad():
            return float(self._micro_batch_loss(positions))

    def step(self, step: int) -> float:
        """One optimizer step over the global batch (batch size x processes x grad accumulation); returns
        its mean loss, the same on every process."""
        import paddle
        import paddle.distributed as dist

        config = self.config
        micro, accum = config.batch_size, config.grad_accum
        global_batch = micro * self.world * accum
        total = 0.0
        for part in range(accum):
            first = step * global_batch + (part * self.world + self.rank) * micro
            loss = self._micro_batch_loss(list(range(first, first + micro))) / accum
            loss.backward()
            total += float(loss)
        if self.world > 1:
            with paddle.no_grad():
                for parameter in self.trainable.values():
                    dist.all_reduce(parameter.grad)
                    parameter.grad.scale_(1.0 / self.world)
            summed = paddle.to_tensor([total], dtype="float64")
            dist.all_reduce(summed)
            total = float(summed.item()) / self.world
        self.optimizer.step()
        self.optimizer.clear_grad()
        return total

    # Checkpoints: trainable weights and optimizer state by our own stable names (Paddle's generated
    # parameter names depend on how many layers the process built before).

    def save_checkpoint(self, folder: Path, step: int) -> None:
        from safetensors.numpy import save_file

        by_paddle_name = {parameter.name: name for name, parameter in self.trainable.items()}
        weights = {name: parameter.numpy() for name, parameter in self.trainable.items()}
        optimizer_state, extra = {}, {}
        for key, value in self.optimizer.state_dict().items():
            if hasattr(value, "numpy"):
                paddle_name, accumulator = _split_accumulator(key, by_paddle_name)
                optimizer_state[f"{by_paddle_name[paddle_name]}|{accumulator}"] = value.numpy()
            elif key != "master_weights":
                extra[key] = value
        save_file(weights, str(folder / TRAINABLE_FILE))
        save_file(optimizer_state, str(folder / OPTIMIZER_FILE))
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "optimizer": extra}), encoding="utf-8")

    def load_checkpoint(self, folder: Path) -> int:
        from safetensors.numpy import load_file

        weights = load_file(str(folder / TRAINABLE_FILE))
        if set(weights) != set(self.trainable):
            raise InputError(f"{folder}: the checkpoint's tensors are not this run's trainable weights")
        for name, parameter in self.trainable.items():
            parameter.set_value(weights[name])
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        by_name = {name: parameter.name for name, parameter in self.trainable.items()}
        optimizer_state = {}
        for key, value in load_file(str(folder / OPTIMIZER_FILE)).items():
            name, accumulator = key.split("|")
            optimizer_state[f"{by_name[name]}_{accumulator}"] = value
        optimizer_state.update(state["optimizer"])
        import paddle

        self.optimizer.set_state_dict({key: paddle.to_tensor(value) if isinstance(value, np.ndarray) else value
                                       for key, value in optimizer_state.items()})
        return int(state["step"])

    def lora_tensors(self) -> dict:
        from riffusion import lora

        return lora.state_dict(self.unet_lora, self.text_lora)


def _split_accumulator(key: str, names: dict) -> tuple[str, str]:
    """Optimizer state keys are f"{parameter name}_{accumulator}" (e.g. linear_3.w_0_moment1_0)."""
    for paddle_name in names:
        if key.startswith(paddle_name + "_"):
            return paddle_name, key[len(paddle_name) + 1:]
    raise RuntimeError(f"optimizer state {key} belongs to no trainable parameter")


# The run folder.

def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint(trainer: Trainer, run: Path, step: int) -> Path:
    """checkpoints/step-N, written beside and renamed into place; older checkpoints are removed after."""
    checkpoints = run / CHECKPOINTS
    checkpoints.mkdir(exist_ok=True)
    final = checkpoints / f"step-{step:08d}"
    staging = checkpoints / f".step-{step:08d}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    trainer.save_checkpoint(staging, step)
    _fsync_folder(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in checkpoints.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    folders = sorted(path for path in (run / CHECKPOINTS).glob("step-*") if (path / STATE_FILE).is_file()) \
        if (run / CHECKPOINTS).is_dir() else []
    return folders[-1] if folders else None


def read_log(run: Path, up_to: int) -> list[dict]:
    """log.jsonl's entries for steps 1..up_to (a line cut short by a kill is dropped)."""
    entries = []
    path = run / LOG_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= up_to:
                entries.append(entry)
    return entries


def write_output(trainer: Trainer, run: Path) -> None:
    from riffusion import lora

    if not trainer.config.full:
        lora.save(trainer.lora_tensors(), run)
        return
    library = Path(trainer.config.checkpoint)
    for part in LIBRARY_PARTS:
        source, target = library / part, run / part
        if part == "text_encoder" and trainer.config.train_text_encoder:
            continue
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    trainer.unet.save_pretrained(str(run / "unet"))
    if trainer.config.train_text_encoder:
        trainer.text_encoder.save_pretrained(str(run / "text_encoder"))


def train(config: TrainConfig, run: Path, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> list[dict]:
    """Run (or continue) training into `run`; returns the log entries of every step."""
    config.check()
    import paddle.distributed as dist
    from tqdm import tqdm

    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if world > 1:
        os.environ.setdefault("PADDLE_DISTRI_BACKEND", "gloo")  # Paddle's CPU collective (NCCL needs GPUs)
        dist.init_parallel_env()
    rank = dist.get_rank() if world > 1 else 0
    main = rank == 0
    run = Path(run).absolute()
    if run.exists() and not run.is_dir():
        raise InputError(f"{run}: exists and is not a folder")
    if not resume and main and run.exists() and any(run.iterdir()) and not overwrite:
        raise InputError(f"{run}: not empty (pass --resume to continue it, --overwrite to start again)")
    trainer = Trainer(config, rank, world, quiet=quiet or not main)
    if not resume:
        if main:  # the other processes wait at the barrier; the launcher stops them if this one fails
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            (run / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
        if world > 1:
            dist.barrier()
    start = 0
    checkpoint = latest_checkpoint(run) if resume else None
    if checkpoint is not None:
        start = trainer.load_checkpoint(checkpoint)
        if start > config.steps:
            raise InputError(f"{checkpoint}: the run is already at step {start}, past --steps {config.steps}")
    log = read_log(run, start)
    if main:
        (run / LOG_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in log), encoding="utf-8")
        for stale in (run / CHECKPOINTS).glob(".step-*") if (run / CHECKPOINTS).is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)

    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", unit="step",
                    disable=quiet or not main)
    with open(run / LOG_FILE, "a", encoding="utf-8") if main else open(os.devnull, "w") as log_file:
        for step in progress:
            began = time.perf_counter()
            loss = trainer.step(step)
            if not math.isfinite(loss):
                raise InputError(f"loss became {loss} at step {step + 1}; lower --lr")
            entry = {"step": step + 1, "loss": loss, "lr": config.lr, "seconds": round(time.perf_counter() - began, 3)}
            log.append(entry)
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            progress.set_postfix(loss=f"{loss:.4f}")
            done = step + 1
            if main and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                write_checkpoint(trainer, run, done)
    if main:
        write_checkpoint(trainer, run, config.steps)
        write_output(trainer, run)
    if world > 1:
        dist.barrier()
    return log


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m riffusion.train", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_version(p)
    p.add_argument("--checkpoint", type=Path, help="a library made by python -m convert")
    p.add_argument("--data", type=Path, help="a dataset made by python -m riffusion.dataset")
    p.add_argument("--out", type=Path, help="the run folder to write")
    p.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue RUN from its last checkpoint with its own options (only --steps may change)")
    defaults = TrainConfig("", "")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {defaults.rank})")
    p.add_argument("--alpha", type=float, help="LoRA alpha; the adapter is scaled by alpha / rank (default: rank)")
    p.add_argument("--targets", help="comma-separated UNet layer names (suffixes) that get LoRA "
                                     f"(default {','.join(defaults.targets)}: every attention projection)")
    p.add_argument("--full", action="store_true", default=None, help="train the whole UNet, write a complete library")
    p.add_argument("--train-text-encoder", action="store_true", default=None,
                   help="train the text encoder too (LoRA on its attention projections, or all with --full)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, help=f"clips per process per micro batch (default {defaults.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro batches per optimizer step (default {defaults.grad_accum})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {defaults.lr})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {defaults.weight_decay})")
    p.add_argument("--max-grad-norm", type=float, help=f"clip the gradient's global norm; 0: off (default {defaults.max_grad_norm})")
    p.add_argument("--seed", type=int, help=f"(default {defaults.seed})")
    p.add_argument("--checkpoint-every", type=int, metavar="K", help=f"steps between checkpoints; 0: only at the end "
                                                                     f"(default {defaults.checkpoint_every})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from(args) -> tuple[TrainConfig, Path]:
    options = {item.name: getattr(args, item.name) for item in fields(TrainConfig)
               if item.name not in ("checkpoint", "data") and getattr(args, item.name, None) is not None}
    if isinstance(options.get("targets"), str):
        options["targets"] = [target.strip() for target in options["targets"].split(",") if target.strip()]
    if args.resume is not None:
        given = set(options) - {"steps"} | {name for name in ("checkpoint", "data", "out") if getattr(args, name)}
        if given:
            raise InputError(f"--resume takes the run's own options; only --steps may be given (got --{sorted(given)[0].replace('_', '-')})")
        from riffusion.files import read_json

        saved = read_json(args.resume / CONFIG_FILE)
        try:
            config = TrainConfig(**{**saved, **options})
        except TypeError as error:
            raise InputError(f"{args.resume / CONFIG_FILE}: not a training config ({error})") from None
        return config, args.resume
    missing = [name for name in ("checkpoint", "data", "out") if getattr(args, name) is None]
    if missing:
        raise InputError(f"--{missing[0]} is required (or --resume RUN)")
    return TrainConfig(str(args.checkpoint.absolute()), str(args.data.absolute()), **options), args.out


@command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()
    tune_cpu_runtime()
    config, run = config_from(args)
    log = train(config, run, resume=args.resume is not None, overwrite=args.overwrite, quiet=args.quiet)
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0 and log:
        print(f"trained {config.steps} steps, loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; wrote {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
