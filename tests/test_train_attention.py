"""The trainer's blockwise attention (riffusion.attention) computes what ppdiffusers' AttnProcessor computes."""

import json

import numpy as np
import pytest


def _stock(query, key, value, scale):
    import paddle
    import paddle.nn.functional as F

    return paddle.matmul(F.softmax(paddle.matmul(query, key, transpose_y=True) * scale, axis=-1), value)


@pytest.mark.parametrize("budget", [100, 2 * 50 * 33, 10**9], ids=["row-blocks", "head-blocks", "one-block"])
def test_block_attention_matches_softmax_attention(budget):
    """Output and the gradients of q, k and v equal softmax(scale q k^T) v's, whether the scores are split into
    blocks of rows (with a remainder block), of whole heads, or not at all (measured: <= 7.7e-6, float
    summation order; the values reach about 100)."""
    import paddle

    from riffusion.attention import block_attention

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape, dtype=np.float32) * 2 for shape in ((6, 50, 8), (6, 33, 8), (6, 33, 8))]
    upstream = paddle.to_tensor(rng.standard_normal((6, 50, 8), dtype=np.float32))
    results = []
    for attend in (_stock, lambda q, k, v, scale: block_attention(q, k, v, scale, budget)):
        tensors = [paddle.to_tensor(array, stop_gradient=False) for array in arrays]
        out = attend(*tensors, 8 ** -0.5)
        (out * upstream).sum().backward()
        results.append([out.numpy()] + [tensor.grad.numpy() for tensor in tensors])
    differences = [float(np.abs(a - b).max()) for a, b in zip(*results)]
    print(f"budget {budget}: max abs difference out/dq/dk/dv {differences}")
    assert max(differences) < 2e-5


def test_trainer_blockwise_attention_matches_stock(paddle_library, tmp_path, monkeypatch):
    """The tiny model's training loss and the gradients of every LoRA weight (up and down, the up weights set
    non-zero) are the same with the blockwise attention (split into many blocks here) as with ppdiffusers'
    AttnProcessor, within float rounding (measured: loss equal, gradients 3.1e-6 of their largest value).
    Gradients rather than weights after AdamW steps: Adam's first step divides each gradient by its own
    size, which turns rounding differences of near-zero gradients into weight differences of lr."""
    from PIL import Image

    from riffusion import attention
    from riffusion.train import Trainer, TrainConfig

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "images" / "clip.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "images/clip.png", "text": "a tone"}) + "\n")
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", 200)
    runs = {}
    for kind in ("stock", "blockwise"):
        trainer = Trainer(TrainConfig(str(paddle_library), str(data)), attention=kind)
        rng = np.random.default_rng(2)
        for name, parameter in sorted(trainer.trainable.items()):
            if name.endswith("up.weight"):
                parameter.set_value(rng.normal(0, 0.1, parameter.shape).astype(np.float32))
        loss = trainer._micro_batch_loss([0])
        loss.backward()
        runs[kind] = float(loss), {name: p.grad.numpy() for name, p in trainer.trainable.items()}
    (stock_loss, stock), (block_loss, block) = runs["stock"], runs["blockwise"]
    largest = max(float(np.abs(g).max()) for g in stock.values())
    difference = max(float(np.abs(stock[name] - block[name]).max()) for name in stock) / largest
    print(f"loss stock {stock_loss} blockwise {block_loss}; max abs gradient difference {difference:.1e} of the "
          f"largest gradient {largest:.2e}")
    assert abs(block_loss - stock_loss) <= 1e-5 * abs(stock_loss)
    assert difference < 1e-4
    assert all(float(np.abs(g).max()) > 0 for g in block.values())  # every LoRA weight gets a gradient


_MATMUL = """
import json, sys
import numpy as np
if sys.argv[1] == "tuned":
    from riffusion.cpu_tuning import tune_cpu_runtime
    tune_cpu_runtime()
import os, paddle, ppdiffusers
rng = np.random.default_rng(0)
a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in ((256, 320), (320, 640)))
weight = rng.standard_normal((16, 8, 3, 3), dtype=np.float32)
image = rng.standard_normal((1, 8, 16, 16), dtype=np.float32)
product = paddle.matmul(paddle.to_tensor(a), paddle.to_tensor(b)).numpy()
conv = paddle.nn.functional.conv2d(paddle.to_tensor(image), paddle.to_tensor(weight), padding=1).numpy()
np.save(sys.argv[2], np.concatenate([product.ravel(), conv.ravel()]))
print(json.dumps({"torch": "torch" in sys.modules, "mkl": os.environ.get("MKL_DEBUG_CPU_TYPE")}))
"""


def test_tuned_cpu_runtime_keeps_the_numbers(tmp_path):
    """tune_cpu_runtime (what python -m riffusion.train runs before Paddle loads: MKL's fast path on AMD CPUs,
    glibc reusing freed memory, torch kept out of the process) leaves a matmul and a convolution equal to the
    default runtime's within float rounding (measured 3.8e-5 on values up to 83), sets MKL's CPU type only on
    AMD, and keeps torch unloaded even though it is installed here."""
    import os
    import subprocess
    import sys
    from riffusion.cpu_tuning import cpu_vendor

    results = {}
    for kind in ("default", "tuned"):
        out = tmp_path / f"{kind}.npy"
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MKL_", "USE_TORCH"))}
        done = subprocess.run([sys.executable, "-c", _MATMUL, kind, str(out)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)
    (_, default), (info, tuned) = results["default"], results["tuned"]
    difference = float(np.abs(default - tuned).max())
    print(f"tuned vs default runtime: max abs difference {difference:.2e} (max |value| {np.abs(default).max():.1f})")
    assert difference < 1e-4
    assert info["torch"] is False
    assert info["mkl"] == ("5" if cpu_vendor() == "AuthenticAMD" else None)
