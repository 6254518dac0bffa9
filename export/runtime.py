"""Runtimes for exported components, callable like the dynamic ppdiffusers models they replace.

    unet = load_unet("riffusion-export", backend="static")        # Paddle Inference, oneDNN, all cores
    noise = unet(sample, timestep, encoder_hidden_states).sample    # same call as UNet2DConditionModel
    pipe = load_pipeline("riffusion-paddle", "riffusion-export", unet="onnx", vae="static")

Backends:

- "static": Paddle Inference on OUT/<component>/inference.json + inference.pdiparams.
  CPU: oneDNN on, `threads` math-library threads (default: every core this process may use);
  `precision="bf16"` runs oneDNN's bfloat16 kernels (CPUs with AVX512-BF16 or AMX only).
  GPU (`device="gpu"`, needs paddlepaddle-gpu): `fp16=True` runs the program in half precision
  (inputs and outputs stay float32); `tensorrt=True` hands supported subgraphs to TensorRT: the
  first such session runs without it and records tensor shape ranges in
  OUT/<component>/shape_range_info.pbtxt, later ones build engines for them. Not tested here: no
  GPU on these machines.
- "onnx": onnxruntime on OUT/<component>/model.onnx, `threads` intra-op threads; `precision="int8"`
  runs model.int8.onnx where the export holds one (the UNet), model.onnx elsewhere.
  GPU (`device="gpu"`, needs onnxruntime-gpu): CUDAExecutionProvider, with `tensorrt=True`
  TensorrtExecutionProvider first (fp16 when `fp16=True`). Not tested here.

Inputs may be paddle Tensors or numpy arrays; outputs are paddle Tensors in output objects that read
like ppdiffusers' (`.sample`, `[0]`, `return_dict=False` tuples), so pipelines work unchanged.
The UNet, text encoder and VAE decoder runtimes import paddle (or onnxruntime) and numpy only;
ppdiffusers, which imports torch when it is installed, is imported for `VaeRuntime.encode` (its
`DiagonalGaussianDistribution`, so sampling draws the same numbers) and `load_pipeline`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from export import precision as precisions
from export.specs import SPECS, ComponentSpec

BACKENDS = ("dynamic", "static", "onnx")
STATIC_PROGRAM = "inference.json"
STATIC_PARAMS = "inference.pdiparams"
ONNX_MODEL = "model.onnx"
CONFIG_NAME = "config.json"  # the model config as ppdiffusers loaded it (defaults filled in), written at export
REPORT_NAME = "export_report.json"


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_all_cores(threads: int | None = None) -> int:
    """Let Paddle's dynamic (eager) mode use `threads` CPU threads (default: all cores) and return the
    number. `import paddle` pins its CPU math library to one thread (it sets OMP_NUM_THREADS=1 when
    unset, and setting that variable does not raise it): the full-size UNet step at batch 2, 32x32
    latents took 11.8 s on one thread and 6.7 s on two here. Process-wide; static runtimes set their
    own threads."""
    from paddle.base import core

    threads = threads or cpu_count()
    core.set_num_threads(threads)
    return threads


# --- sessions: numpy in, numpy out ---------------------------------------------------------------


class PaddleInferenceSession:
    """One exported program in Paddle Inference.

    Sets `FLAGS_pir_apply_inplace_pass=0` for the process: in Paddle 3.3 that pass lets oneDNN
    kernels (silu, sin, cos) overwrite an input other ops still read, which silently corrupts
    results (`silu(y) + y` came out as `silu(y) + silu(y)`). Skipping it costs some memory only.
    """

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None, fp16: bool = False,
                 tensorrt: bool = False, onednn: bool = True, gpu_memory_mb: int = 1024, device_id: int = 0,
                 precision: str = "fp32"):
        import paddle
        import paddle.inference as paddle_infer
        from paddle.base import core

        precisions.check_pair("static", precision)
        if precision == "bf16":
            if device != "cpu" or not onednn:
                raise ValueError("bf16 runs on the CPU with oneDNN (on a GPU, use fp16=True)")
            precisions.require("bf16")
        paddle.set_flags({"FLAGS_pir_apply_inplace_pass": False})
        folder = Path(folder)
        program, params = folder / STATIC_PROGRAM, folder / STATIC_PARAMS
        for path in (program, params):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (export the component with `python -m export`)")
        config = paddle_infer.Config(str(program), str(params))
        config.disable_glog_info()
        config.switch_ir_optim(True)
        if device == "gpu":
            precision = paddle_infer.PrecisionType.Half if fp16 else paddle_infer.PrecisionType.Float32
            config.enable_use_gpu(gpu_memory_mb, device_id, precision)
            if tensorrt:
                # TensorRT needs the shape range of every tensor: the first session records them while it
                # runs without TensorRT; later sessions build engines for those ranges
                shape_file = folder / "shape_range_info.pbtxt"
                if shape_file.is_file():
                    config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1, min_subgraph_size=3,
                                                  precision_mode=precision, use_static=False, use_calib_mode=False)
                    config.enable_tuned_tensorrt_dynamic_shape(str(shape_file), True)
                else:
                    config.collect_shape_range_info(str(shape_file))
        elif device == "cpu":
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads or cpu_count())
            if onednn:
                config.enable_onednn()
                if precision == "bf16":
                    config.enable_onednn_bfloat16()
                if not core.supports_avx512f():
                    # its fused kernel (the exported self-attention matches it) is AVX-512 code
                    config.delete_pass("self_attention_fuse_pass")
            else:
                config.disable_onednn()
        else:
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.predictor = paddle_infer.create_predictor(config)
        self.input_names = list(self.predictor.get_input_names())
        self.output_names = list(self.predictor.get_output_names())

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name in self.input_names:
            handle = self.predictor.get_input_handle(name)
            value = np.ascontiguousarray(inputs[name])
            handle.reshape(list(value.shape))
            handle.copy_from_cpu(value)
        self.predictor.run()
        return [self.predictor.get_output_handle(name).copy_to_cpu() for name in self.output_names]


class OnnxSession:
    """One exported model.onnx in onnxruntime."""

    def __init__(self, folder: Path, device: str = "cpu", threads: int | None = None, fp16: bool = False,
                 tensorrt: bool = False, device_id: int = 0, precision: str = "fp32"):
        import onnxruntime as ort

        precisions.check_pair("onnx", precision)
        path = Path(folder) / ONNX_MODEL
        if precision == "int8" and (Path(folder) / precisions.INT8_MODEL).is_file():
            path = Path(folder) / precisions.INT8_MODEL
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (export the component with `python -m export --onnx`)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the exported graphs carry unused constants it would warn about
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cpu":
            options.intra_op_num_threads = threads or cpu_count()
            options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
        elif device == "gpu":
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
            if tensorrt:
                trt = {"device_id": device_id, "trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(Path(folder) / "trt_cache")}
                providers.insert(0, ("TensorrtExecutionProvider", trt))
        else:
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_names = [item.name for item in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {name: np.ascontiguousarray(inputs[name]) for name in self.input_names})


def open_session(folder: Path, backend: str, **options):
    if backend == "static":
        return PaddleInferenceSession(folder, **options)
    if backend == "onnx":
        options.pop("onednn", None)
        return OnnxSession(folder, **options)
    raise ValueError(f"backend must be 'static' or 'onnx', got {backend!r}")


# --- components: called like the dynamic models --------------------------------------------------


class Config(dict):
    """A model config read like ppdiffusers' FrozenDict: `config.in_channels` or `config["in_channels"]`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Output(dict):
    """A model output read like ppdiffusers' BaseOutput: `.sample`, `["sample"]` or `[0]`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class ComponentRuntime:
    """An exported component: checks inputs against its spec, runs the session, wraps outputs."""

    def __init__(self, spec: ComponentSpec, session, config: dict):
        self.spec = spec
        self.session = session
        self._internal_dict = Config(config)  # ppdiffusers pipelines read (and may replace) this

    @property
    def config(self):
        return self._internal_dict

    @property
    def dtype(self):
        import paddle

        return paddle.float32

    def eval(self):
        return self

    def run(self, **inputs) -> list[np.ndarray]:
        values = {}
        for spec in self.spec.inputs:
            values[spec.name] = _numpy(inputs[spec.name], spec.dtype)
        self.spec.check_inputs(values, dict(self.config))
        return self.session.run(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.session).__name__})"


class UNetRuntime(ComponentRuntime):
    """Called like `UNet2DConditionModel`: (sample, timestep, encoder_hidden_states) -> `.sample`."""

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                 attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None,
                 down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        import paddle

        extras = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                      down_block_additional_residuals=down_block_additional_residuals,
                      mid_block_additional_residual=mid_block_additional_residual,
                      down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                      encoder_attention_mask=encoder_attention_mask, added_cond_kwargs=added_cond_kwargs or None)
        unsupported = [name for name, value in extras.items() if value is not None]
        if cross_attention_kwargs and cross_attention_kwargs.get("scale", 1.0) != 1.0:
            unsupported.append("cross_attention_kwargs")
        if unsupported:
            raise ValueError(f"the exported unet takes sample, timestep and encoder_hidden_states only, not {unsupported[0]}")
        timestep = _numpy(timestep, "float32").reshape(-1)
        (out,) = self.run(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)
        out = paddle.to_tensor(out)
        return Output(sample=out) if return_dict else (out,)


class TextEncoderRuntime(ComponentRuntime):
    """Called like ppdiffusers' `CLIPTextModel`: input_ids -> (last_hidden_state, pooler_output)."""

    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_attentions=None,
                 output_hidden_states=None, return_dict: bool = True):
        import paddle

        if output_hidden_states or output_attentions:
            raise ValueError("the exported text_encoder returns the last hidden state and the pooled output only "
                             "(no clip_skip, no attentions)")
        if position_ids is not None:
            raise ValueError("the exported text_encoder takes input_ids only, not position_ids")
        if attention_mask is not None and not bool(np.all(_numpy(attention_mask, "int64"))):
            raise ValueError("the exported text_encoder takes no attention mask (CLIP in Stable Diffusion uses none)")
        max_positions = int(self.config.get("max_position_embeddings", 77))
        ids = _numpy(input_ids, "int64")
        if ids.ndim == 2 and ids.shape[1] > max_positions:
            raise ValueError(f"text_encoder input 'input_ids': at most {max_positions} tokens, got {ids.shape[1]}")
        hidden, pooled = (paddle.to_tensor(out) for out in self.run(input_ids=ids))
        if not return_dict:
            return hidden, pooled
        return Output(last_hidden_state=hidden, pooler_output=pooled)


class VaeRuntime:
    """Called like `AutoencoderKL`: `.encode(image).latent_dist`, `.decode(latents).sample`, `.config`.
    Either half may be missing (then calling it raises)."""

    def __init__(self, encoder: ComponentRuntime | None, decoder: ComponentRuntime | None, config: dict):
        self.encoder, self.decoder = encoder, decoder
        self._internal_dict = Config(config)
        self.use_slicing = self.use_tiling = False

    config = ComponentRuntime.config
    dtype = ComponentRuntime.dtype

    def eval(self):
        return self

    def encode(self, x, return_dict: bool = True):
        import paddle
        from ppdiffusers.models.vae import DiagonalGaussianDistribution

        if self.encoder is None:
            raise ValueError("vae_encoder was not loaded")
        (moments,) = self.encoder.run(sample=x)
        posterior = DiagonalGaussianDistribution(paddle.to_tensor(moments))
        return Output(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z, return_dict: bool = True, generator=None):
        import paddle

        if self.decoder is None:
            raise ValueError("vae_decoder was not loaded")
        (sample,) = self.decoder.run(latent_sample=z)
        sample = paddle.to_tensor(sample)
        return Output(sample=sample) if return_dict else (sample,)

    def __repr__(self) -> str:
        return f"VaeRuntime(encoder={self.encoder!r}, decoder={self.decoder!r})"


RUNTIMES = {"unet": UNetRuntime, "text_encoder": TextEncoderRuntime, "vae_encoder": ComponentRuntime,
            "vae_decoder": ComponentRuntime}


def load_component(exported: str | Path, name: str, backend: str = "static", **options) -> ComponentRuntime:
    """One exported component (unet, text_encoder, vae_encoder, vae_decoder) of an export folder."""
    if name not in SPECS:
        raise ValueError(f"unknown component {name!r} (one of {', '.join(SPECS)})")
    folder = Path(exported) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing: {exported} holds no exported {name}")
    if options.get("precision") == "int8" and name in precisions.INT8_COMPONENTS \
            and not (folder / precisions.INT8_MODEL).is_file():
        raise FileNotFoundError(f"{folder / precisions.INT8_MODEL}: missing: {exported} holds no int8 {name} (export it "
                                f"with --precision int8; it is kept only where its image PSNR reaches "
                                f"{precisions.MIN_PSNR_DB['int8']:g} dB)")
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return RUNTIMES[name](SPECS[name], open_session(folder, backend, **options), config)


def load_unet(exported, backend: str = "static", **options) -> UNetRuntime:
    return load_component(exported, "unet", backend, **options)


def load_text_encoder(exported, backend: str = "static", **options) -> TextEncoderRuntime:
    return load_component(exported, "text_encoder", backend, **options)


def load_vae(exported, backend: str = "static", encoder: bool = True, decoder: bool = True, **options) -> VaeRuntime:
    parts = {}
    for name, wanted in (("vae_encoder", encoder), ("vae_decoder", decoder)):
        parts[name] = load_component(exported, name, backend, **options) if wanted else None
    present = parts["vae_decoder"] or parts["vae_encoder"]
    return VaeRuntime(parts["vae_encoder"], parts["vae_decoder"], dict(present.config) if present else {})


def read_report(exported: str | Path) -> dict:
    """The export's report (export_report.json), {} for an export that has none."""
    path = Path(exported) / REPORT_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def choose_variant(exported: str | Path, runtime: str | None = None, precision: str | None = None) -> tuple[str, str]:
    """(runtime, precision) to run `exported` in: the ones asked for, checked against what the export
    holds and the CPU supports, with the blanks filled by the fastest variant the export's report timed
    (its `variants`, timed at export on this model's size). Exports without timings: static fp32 (on
    the tiny model onnxruntime was 2x slower than Paddle Inference), else onnx fp32."""
    from export.errors import ExportError

    exported = Path(exported)
    variants = read_report(exported).get("variants", {})
    for given, known in ((runtime, precisions.RUNTIME_PRECISIONS), (precision, precisions.PRECISIONS)):
        if given is not None and given not in known:
            raise ExportError(f"unknown {'runtime' if known is precisions.RUNTIME_PRECISIONS else 'precision'} "
                              f"{given!r} (choose from {', '.join(known)})")
    if runtime and precision:
        precisions.check_pair(runtime, precision)
    if precision:
        precisions.require(precision)

    def held(name: str, entry: dict) -> bool:
        files = {"static": STATIC_PROGRAM, "onnx": ONNX_MODEL}
        return (entry.get("shipped", False) and (exported / "unet" / files[entry["runtime"]]).is_file()
                and precisions.supported(entry["precision"]))

    wanted = {name: entry for name, entry in variants.items() if held(name, entry)
              and runtime in (None, entry["runtime"]) and precision in (None, entry["precision"])}
    timed = {name: entry for name, entry in wanted.items() if "estimated_request_s" in entry.get("timing", {})}
    if timed:
        best = min(timed.values(), key=lambda entry: entry["timing"]["estimated_request_s"])
        return best["runtime"], best["precision"]
    if precision not in (None, "fp32"):
        entry = variants.get(precisions.variant_name(runtime or precisions.owner(precision), precision))
        why = f": {entry['reason']}" if entry and entry.get("reason") else " (export it with --precision " + precision + ")"
        raise ExportError(f"{exported} holds no {precision} programs{why}")
    if runtime is None:
        runtime = "static" if (exported / "unet" / STATIC_PROGRAM).is_file() or not (exported / "unet" / ONNX_MODEL).is_file() else "onnx"
    return runtime, "fp32"


def load_pipeline(library: str | Path, exported: str | Path | None = None, unet: str = "dynamic",
                  text_encoder: str = "dynamic", vae: str = "dynamic", **options):
    """A ppdiffusers StableDiffusionPipeline from a converted library, each of unet / text_encoder / vae
    "dynamic" (the library's ppdiffusers model), "static" (Paddle Inference) or "onnx" (onnxruntime)
    from `exported`. `options` go to the runtimes (device, threads, fp16, tensorrt, precision). No safety
    checker: spectrograms are not photographs (riffusion-hobby runs without it too)."""
    import paddle
    from ppdiffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

    import ppdiffusers

    library = Path(library)
    use_all_cores(options.get("threads"))
    choices = {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    for name, backend in choices.items():
        if backend not in BACKENDS:
            raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend != "dynamic" and exported is None:
            raise ValueError(f"{name}={backend!r} needs the export folder (exported=...)")

    def dynamic(cls, folder):
        model = cls.from_pretrained(str(library / folder), paddle_dtype=paddle.float32, low_cpu_mem_usage=True)
        model.eval()
        return model

    index = json.loads((library / "model_index.json").read_text(encoding="utf-8"))
    scheduler_class = getattr(ppdiffusers, index["scheduler"][1])
    components = {
        "unet": dynamic(UNet2DConditionModel, "unet") if unet == "dynamic" else load_unet(exported, unet, **options),
        "text_encoder": (dynamic(CLIPTextModel, "text_encoder") if text_encoder == "dynamic"
                         else load_text_encoder(exported, text_encoder, **options)),
        "vae": dynamic(AutoencoderKL, "vae") if vae == "dynamic" else load_vae(exported, vae, **options),
        "tokenizer": CLIPTokenizer.from_pretrained(str(library / "tokenizer")),
        "scheduler": scheduler_class.from_pretrained(str(library / "scheduler")),
    }
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _numpy(value, dtype: str) -> np.ndarray:
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value, dtype=dtype)
