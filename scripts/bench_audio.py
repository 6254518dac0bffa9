"""Benchmark: spectrogram image <-> audio for one 512x512 image, against a naive baseline.

  (a) audio -> image   5.11 s of synthesized music (chords + drums) -> 512 columns x 512 rows
  (b) image -> audio   that image -> 5.11 s: mel pseudo-inverse + 32 Griffin-Lim iterations

Each is timed against, in the same run:
  naive      one FFT call per frame in a Python loop, as a straightforward port of torchaudio's
             stft/istft would do it; same math, same 32 iterations (for (a): the mel spectrogram
             only, no image)
  exact      this package with exact=True: all frames in one FFT call, every iteration at n_fft
             (64-72 ms per iteration measured on 2 CPU cores is this batched rfft + irfft)
  default    this package: the first 16 iterations on every 4th bin, the last 16 on every 2nd
             (riffusion.spectrogram.griffin_lim_stages)

Then the quality of audio -> image -> audio on synthesized chords and drums: spectral convergence
||S - S'|| / ||S|| of the mel spectrogram (what the image encodes) and of the linear STFT magnitude
up to 10 kHz, where S is the original's and S' the round trip's; "image only" is the floor that the
8-bit image alone costs (its decoded spectrogram against S).

Times are the median and the minimum of --repeats runs (the naive ones: --naive-repeats) after one
untimed warm-up run, wall clock (time.perf_counter); the minimum says more on a shared, busy machine.
The mel pseudo-inverse is built once per process, before timing.

    python scripts/bench_audio.py [--repeats 5] [--naive-repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from riffusion import synth  # noqa: E402
from riffusion.audio import audio_to_image, image_to_audio, normalize_loudness  # noqa: E402
from riffusion.image import spectrogram_from_image  # noqa: E402
from riffusion.params import SpectrogramParams  # noqa: E402
from riffusion.spectrogram import (  # noqa: E402
    GRIFFIN_LIM_MOMENTUM, INT16_SCALE, hann_window, inverse_mel_matrix, linear_from_mel, mel_filterbank,
    num_active_bins, spectral_convergence, spectrogram_from_audio, stft_magnitude)

PARAMS = SpectrogramParams()
SECONDS_FOR_512_COLUMNS = 5.11


def padded_window(params: SpectrogramParams) -> np.ndarray:
    """The win_length hann zero-padded to n_fft, centred, as torch.stft pads it."""
    window = np.zeros(params.n_fft, dtype=np.float32)
    start = (params.n_fft - params.win_length) // 2
    window[start:start + params.win_length] = hann_window(params.win_length)
    return window


def naive_stft(signal: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """[frames, bins]: reflect-pad n_fft / 2, then one rfft per frame."""
    n_fft, hop, window = params.n_fft, params.hop_length, padded_window(params)
    padded = np.pad(signal, n_fft // 2, mode="reflect")
    count = 1 + len(signal) // hop
    return np.stack([scipy.fft.rfft(padded[f * hop:f * hop + n_fft] * window) for f in range(count)])


def naive_istft(spectrum: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """One irfft per frame, overlap-added one frame at a time, divided by the window-square sum."""
    n_fft, hop, window = params.n_fft, params.hop_length, padded_window(params)
    count = len(spectrum)
    out = np.zeros(n_fft + hop * (count - 1), dtype=np.float32)
    envelope = np.zeros_like(out)
    for f in range(count):
        out[f * hop:f * hop + n_fft] += scipy.fft.irfft(spectrum[f], n=n_fft) * window
        envelope[f * hop:f * hop + n_fft] += window**2
    kept = slice(n_fft // 2, n_fft // 2 + hop * (count - 1))
    return out[kept] / envelope[kept]


def naive_audio_to_mel(audio: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    magnitude = np.abs(naive_stft(audio[0] * np.float32(INT16_SCALE), params))
    return (magnitude @ mel_filterbank(params)).T


def naive_mel_to_audio(mel: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """torchaudio's Griffin-Lim loop, frame by frame, from the same pseudo-inverse magnitudes."""
    target = linear_from_mel(mel[None], params)[0].T  # [frames, bins]
    angles = np.exp(2j * np.pi * np.random.default_rng(0).random(target.shape)).astype(np.complex64)
    previous = np.zeros_like(angles)
    for _ in range(params.num_griffin_lim_iters):
        rebuilt = naive_stft(naive_istft(target * angles, params), params)
        angles = rebuilt - previous * (GRIFFIN_LIM_MOMENTUM / (1 + GRIFFIN_LIM_MOMENTUM))
        angles /= np.abs(angles) + 1e-16
        previous = rebuilt
    return naive_istft(target * angles, params)[None] / INT16_SCALE


def seconds(run, repeats: int) -> tuple[float, float]:
    """(median, min) wall seconds of `repeats` runs after a warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def music(seconds: float) -> np.ndarray:
    mix = synth.chord_progression(seconds) + synth.drum_loop(seconds)
    return mix * np.float32(0.8 / np.max(np.abs(mix)))


def bench_speed(repeats: int, naive_repeats: int) -> None:
    audio = music(SECONDS_FOR_512_COLUMNS)
    image = audio_to_image(audio, PARAMS.sample_rate)
    assert image.size == (512, 512), image.size
    mel = spectrogram_from_image(image, PARAMS)[0]
    start = time.perf_counter()
    inverse_mel_matrix(PARAMS)
    print(f"mel pseudo-inverse, built once per process: {time.perf_counter() - start:.3f} s")
    rows = [
        ("(a) audio -> image", {
            "naive": (lambda: naive_audio_to_mel(audio, PARAMS), naive_repeats),
            "default": (lambda: audio_to_image(audio, PARAMS.sample_rate), repeats),
        }),
        ("(b) image -> audio", {
            "naive": (lambda: naive_mel_to_audio(mel, PARAMS), naive_repeats),
            "exact": (lambda: image_to_audio(image, exact=True, normalize=False), repeats),
            "default": (lambda: image_to_audio(image, normalize=False), repeats),
        }),
    ]
    print(f"one {image.width}x{image.height} image, {SECONDS_FOR_512_COLUMNS} s at {PARAMS.sample_rate} Hz; "
          f"median (min) seconds of {repeats} runs ({naive_repeats} for naive)")
    for label, runs in rows:
        timed = {name: seconds(run, count) for name, (run, count) in runs.items()}
        times = "  ".join(f"{name} {median:.3f} ({fastest:.3f})" for name, (median, fastest) in timed.items())
        ratios = ", ".join(f"{name} {timed['naive'][0] / median:.1f}x" for name, (median, _) in timed.items()
                           if name != "naive")
        print(f"  {label}: {times}\n      median speed-up over naive: {ratios}")
    decoded, _ = image_to_audio(image, normalize=False)
    median, fastest = seconds(lambda: normalize_loudness(decoded, PARAMS.sample_rate), repeats)
    print(f"  then the loudness target (normalize_loudness, on by default, not in the times above): "
          f"{median:.3f} ({fastest:.3f})")


def bench_quality() -> None:
    params = PARAMS
    active = num_active_bins(params)
    print("audio -> image -> audio, 5.12 s, spectral convergence (lower is better):")
    print(f"  {'signal':8s} {'schedule':8s} {'mel':>7s} {'linear':>7s} {'image only (mel)':>17s}")
    for name, audio in (("chords", synth.chord_progression()), ("drums", synth.drum_loop())):
        mel = spectrogram_from_audio(audio, params)
        linear = stft_magnitude(audio, params)[:, :active]
        image = audio_to_image(audio, params.sample_rate)
        floor = spectral_convergence(mel, spectrogram_from_image(image, params))
        for schedule, exact in (("default", False), ("exact", True)):
            decoded, _ = image_to_audio(image, exact=exact, normalize=False)
            mel_sc = spectral_convergence(mel, spectrogram_from_audio(decoded, params))
            linear_sc = spectral_convergence(linear, stft_magnitude(decoded, params)[:, :active])
            print(f"  {name:8s} {schedule:8s} {mel_sc:7.4f} {linear_sc:7.4f} {floor:17.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    bench_speed(args.repeats, args.naive_repeats)
    bench_quality()
    return 0


if __name__ == "__main__":
    sys.exit(main())
