"""Audio <-> mel spectrogram, following riffusion-hobby's torchaudio pipeline with numpy and scipy.fft.

Forward: centred ("reflect") STFT with a periodic hann window of win_length zero-padded to n_fft,
magnitude (power 1), then an HTK mel filterbank without norm. Backward: the mel filterbank's
pseudo-inverse (negatives clipped), then Griffin-Lim with momentum 0.99.

Shapes: audio is float32 [channels, samples] in [-1, 1]; spectrograms are [channels, bins, frames].
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft
import scipy.sparse

from riffusion.params import SpectrogramParams

# riffusion-hobby feeds int16 sample values to the STFT, so an image's max value (30e6 by default)
# is in those units. Audio here is float in [-1, 1]: scale by this on the way in and out.
INT16_SCALE = 32768.0

GRIFFIN_LIM_MOMENTUM = 0.99

# Memory bounds. Audio to spectrogram runs the FFT over this many frames at a time (the default 1024
# frames: 72 MB of spectra). Spectrogram to audio (Griffin-Lim) holds the whole STFT several times over:
# frames x FFT bins is at most MAX_STFT_CELLS, 6000 columns (60 s) at the default parameters, measured
# at about 0.23 MB per column (1.4 GB).
FRAMES_PER_BLOCK = 1024
MAX_STFT_CELLS = 6000 * (17640 // 2 + 1)


def num_frames(num_samples: int, params: SpectrogramParams) -> int:
    """Columns of a centred STFT: 5.12 s at 44.1 kHz gives 513."""
    return 1 + num_samples // params.hop_length


def num_samples_for(frames: int, params: SpectrogramParams) -> int:
    """Samples an inverse centred STFT returns: 512 columns give 5.11 s."""
    return (frames - 1) * params.hop_length


@functools.lru_cache(maxsize=4)
def hann_window(length: int) -> np.ndarray:
    """Periodic hann, as torch.hann_window makes it by default."""
    return _read_only((0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32))


@functools.lru_cache(maxsize=4)
def mel_filterbank(params: SpectrogramParams) -> np.ndarray:
    """Triangular HTK mel filters [n_fft // 2 + 1, num_frequencies], as torchaudio's melscale_fbanks."""
    if params.mel_scale_type != "htk" or params.mel_scale_norm is not None:
        raise ValueError("only mel_scale_type='htk' with mel_scale_norm=None is implemented")
    bin_hz = np.linspace(0, params.sample_rate // 2, params.n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(params.min_frequency), _hz_to_mel(params.max_frequency),
                                      params.num_frequencies + 2))
    widths = np.diff(edges_hz)
    # In place: at the largest sizes params allow, each of these is 269 MB.
    rising = bin_hz[:, None] - edges_hz[None, :-2]
    rising /= widths[:-1]
    falling = edges_hz[None, 2:] - bin_hz[:, None]
    falling /= widths[1:]
    np.minimum(rising, falling, out=rising)
    del falling
    np.maximum(rising, 0, out=rising)
    return _read_only(rising.astype(np.float32))


@functools.lru_cache(maxsize=4)
def num_active_bins(params: SpectrogramParams) -> int:
    """STFT bins below the last one any mel filter weighs (4000 of 8821 by default, up to 10 kHz)."""
    return int(np.flatnonzero(mel_filterbank(params).any(axis=1))[-1]) + 1


@functools.lru_cache(maxsize=4)
def inverse_mel_matrix(params: SpectrogramParams) -> np.ndarray:
    """Pseudo-inverse of the mel projection for the active bins, [num_active_bins, num_frequencies]."""
    # Sparse: each mel filter spans a few bins, so the products cost bins x mel bins, not bins x mel bins^2
    # (at the largest sizes params allow, 1024 x 32769, dense ones took most of 30 s).
    projection = scipy.sparse.csr_matrix(mel_filterbank(params)[: num_active_bins(params)].T.astype(np.float64))
    # pinv(A) = A^T pinv(A A^T): a 512 x 512 eigenproblem instead of an SVD of 512 x 4000 (~5x faster).
    gram_inverse = np.linalg.pinv((projection @ projection.T).toarray(), hermitian=True)
    return _read_only(np.asarray(projection.T @ gram_inverse).astype(np.float32))


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


class _Framing:
    """STFT analysis and overlap-add synthesis for one FFT size, all frames in one FFT call.

    Only the win_length samples under the window are touched. Each frame sits at the start of its
    FFT buffer rather than in the middle as in torch.stft: that multiplies every bin by a fixed phase
    and changes no magnitude, and analysis and synthesis share the convention.
    """

    def __init__(self, params: SpectrogramParams, fft_size: int):
        if fft_size < params.win_length:
            raise ValueError(f"FFT size {fft_size} is shorter than the window ({params.win_length})")
        self.params = params
        self.hop = params.hop_length
        self.length = params.win_length
        self.fft_size = fft_size
        self.window = hann_window(self.length)
        # Samples between a frame's start under the window and its centre, as torch.stft pads the
        # window into n_fft and centres frames on hop multiples.
        self.lead = params.n_fft // 2 - (params.n_fft - self.length) // 2

    def frames(self, audio: np.ndarray) -> np.ndarray:
        """The frames [channels, frames, win_length] of a centred, reflect-padded signal: a view, no copy."""
        samples = audio.shape[-1]
        if samples <= max(self.lead, self.length - self.lead):
            raise ValueError(f"{samples} samples is too short for a {self.length}-sample window")
        padded = np.pad(audio, ((0, 0), (self.lead, self.length - self.lead)), mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, self.length, axis=-1)
        return windows[:, : num_samples_for(num_frames(samples, self.params), self.params) + 1 : self.hop]

    def spectra(self, frames: np.ndarray) -> np.ndarray:
        """Complex spectra [channels, frames, fft_size // 2 + 1] of frames [channels, frames, win_length]."""
        return scipy.fft.rfft(frames * self.window, n=self.fft_size, axis=-1, workers=-1)

    def stft(self, audio: np.ndarray) -> np.ndarray:
        return self.spectra(self.frames(audio))

    def istft(self, spectrum: np.ndarray) -> np.ndarray:
        """Least-squares inverse of stft: [channels, frames, bins] -> [channels, (frames - 1) * hop]."""
        frames = scipy.fft.irfft(spectrum, n=self.fft_size, axis=-1, workers=-1)[..., : self.length]
        count = frames.shape[1]
        kept = slice(self.lead, self.lead + num_samples_for(count, self.params))
        summed = overlap_add(frames * self.window, self.hop)
        return summed[:, kept] / window_envelope(self.hop, self.length, count)[:, kept]


def overlap_add(frames: np.ndarray, hop: int) -> np.ndarray:
    """Sum frames [channels, count, length], frame i starting at sample i * hop.

    Frames are cut into hop-long blocks, so the sum is one vectorised add per block index
    (10 for the default 4410-sample window and 441 hop) instead of one per frame.
    """
    channels, count, length = frames.shape
    blocks_per_frame = -(-length // hop)
    if blocks_per_frame * hop != length:
        frames = np.pad(frames, ((0, 0), (0, 0), (0, blocks_per_frame * hop - length)))
    blocks = frames.reshape(channels, count, blocks_per_frame, hop)
    out = np.zeros((channels, count + blocks_per_frame - 1, hop), dtype=frames.dtype)
    for block in range(blocks_per_frame):
        out[:, block : block + count] += blocks[:, :, block]
    return out.reshape(channels, -1)


@functools.lru_cache(maxsize=8)
def window_envelope(hop: int, length: int, count: int) -> np.ndarray:
    """Overlap-added squared windows: what istft divides by to undo analysis and synthesis windows."""
    squares = np.broadcast_to(hann_window(length) ** 2, (1, count, length))
    return _read_only(overlap_add(squares, hop))


def stft_magnitude(audio: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """|STFT| in int16 units, [channels, n_fft // 2 + 1, frames], as torchaudio's Spectrogram(power=1)."""
    spectrum = _Framing(params, params.n_fft).stft(_as_int16_units(audio))
    return np.abs(spectrum).transpose(0, 2, 1)


def spectrogram_from_audio(audio: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """Mel magnitude spectrogram [channels, num_frequencies, frames] of float audio [channels, samples].

    Frames go through the FFT FRAMES_PER_BLOCK at a time, so memory beyond the input and the output
    stays bounded however long the audio (all at once, 10 minutes took 8.9 GB).
    """
    framing = _Framing(params, params.n_fft)
    frames = framing.frames(_as_int16_units(audio))
    active = num_active_bins(params)
    projection = mel_filterbank(params)[:active].T
    out = np.empty((frames.shape[0], params.num_frequencies, frames.shape[1]), dtype=np.float32)
    for start in range(0, frames.shape[1], FRAMES_PER_BLOCK):
        block = slice(start, start + FRAMES_PER_BLOCK)
        magnitude = np.abs(framing.spectra(frames[:, block])[..., :active])
        out[:, :, block] = np.matmul(projection, magnitude.transpose(0, 2, 1))
    return out


def check_decodable(frames: int, params: SpectrogramParams) -> None:
    """Refuse a spectrogram Griffin-Lim would need more than about 1.5 GB for (MAX_STFT_CELLS)."""
    cells = frames * (params.n_fft // 2 + 1)
    if cells > MAX_STFT_CELLS:
        longest = MAX_STFT_CELLS // (params.n_fft // 2 + 1)
        raise ValueError(f"a spectrogram {frames} columns long is too long to decode: at most {longest} columns "
                         f"({longest * params.step_size_ms / 1000:.0f} s) with an FFT of {params.n_fft}")


def linear_from_mel(mel: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """Non-negative |STFT| estimate [channels, n_fft // 2 + 1, frames] from a mel spectrogram."""
    channels, _, frames = mel.shape
    linear = np.zeros((channels, params.n_fft // 2 + 1, frames), dtype=np.float32)
    active = np.matmul(inverse_mel_matrix(params), mel.astype(np.float32))
    np.maximum(active, 0, out=linear[:, : active.shape[1]])
    return linear


def griffin_lim_stages(params: SpectrogramParams, exact: bool = False) -> list[tuple[int, int]]:
    """(frequency subsampling, iterations) for each Griffin-Lim stage.

    exact: every iteration on the n_fft grid, as riffusion-hobby (torchaudio) runs it. Otherwise the
    first half of the iterations runs on an FFT the window's own length (n_fft / 4 by default: the
    same windowed frames, every 4th bin, so a quarter of the same magnitude constraints) and the
    second half on every 2nd bin (n_fft / 2). Early iterations only shape the phase roughly, and
    8820 points already sample a 4410-sample frame's squared magnitude densely enough to fix it
    everywhere (it is the DFT of the frame's autocorrelation, 8819 lags long). Measured by
    scripts/bench_audio.py: 2.5-3x faster; mel spectral convergence of a round trip 0.081 against
    0.069 (chords) and 0.073 against 0.072 (drums).
    """
    iterations = params.num_griffin_lim_iters
    coarse = max(params.n_fft // params.win_length, 1)
    while params.n_fft % coarse:
        coarse -= 1
    if exact or coarse == 1:
        return [(1, iterations)]
    return [(coarse, iterations // 2), (max(coarse // 2, 1), iterations - iterations // 2)]


def griffin_lim(magnitude: np.ndarray, params: SpectrogramParams, exact: bool = False,
                seed: int = 0) -> np.ndarray:
    """Audio [channels, (frames - 1) * hop_length], in the magnitude's units, whose STFT magnitude
    approaches `magnitude` [channels, n_fft // 2 + 1, frames].

    Fast Griffin-Lim (Perraudin, Balazs and Sondergaard 2013) as torchaudio runs it: momentum 0.99,
    random initial phase (seeded: the same input gives the same audio), stages as griffin_lim_stages.
    Bins above the highest non-zero one never enter the loop.
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    nonzero_bins = np.flatnonzero(magnitude.any(axis=(0, 2)))
    active = int(nonzero_bins[-1]) + 1 if nonzero_bins.size else 1
    weight = np.float32(GRIFFIN_LIM_MOMENTUM / (1 + GRIFFIN_LIM_MOMENTUM))
    spectrum, synthesis = None, None
    for subsampling, iterations in griffin_lim_stages(params, exact):
        analysis = _Framing(params, params.n_fft // subsampling)
        target = np.ascontiguousarray(magnitude[:, :active:subsampling].transpose(0, 2, 1))
        if spectrum is None:
            phase = np.random.default_rng(seed).random(target.shape, dtype=np.float32)
            spectrum, synthesis = target * np.exp(2j * np.pi * phase).astype(np.complex64), analysis
        previous = np.zeros_like(spectrum, shape=target.shape)
        for _ in range(iterations):
            rebuilt = analysis.stft(synthesis.istft(spectrum))[..., : target.shape[-1]]
            # In place, on buffers about to be dropped: spectrum = target * unit(rebuilt - weight * previous).
            previous *= -weight
            previous += rebuilt
            scale = np.abs(previous)
            scale += np.float32(1e-16)
            np.divide(target, scale, out=scale)
            previous *= scale
            spectrum, previous, synthesis = previous, rebuilt, analysis
    return synthesis.istft(spectrum)


def audio_from_spectrogram(mel: np.ndarray, params: SpectrogramParams, exact: bool = False,
                           seed: int = 0) -> np.ndarray:
    """Float audio [channels, (frames - 1) * hop_length] from a mel spectrogram in int16 units."""
    check_decodable(mel.shape[-1], params)
    return griffin_lim(linear_from_mel(mel, params), params, exact, seed) / np.float32(INT16_SCALE)


def spectral_convergence(reference: np.ndarray, estimate: np.ndarray) -> float:
    """||reference - estimate|| / ||reference|| (Frobenius), for magnitude spectrograms of one shape."""
    return float(np.linalg.norm(reference - estimate) / np.linalg.norm(reference))


def _as_int16_units(audio: np.ndarray) -> np.ndarray:
    return np.asarray(audio, dtype=np.float32) * np.float32(INT16_SCALE)


def _read_only(array: np.ndarray) -> np.ndarray:
    """Cached arrays are shared between callers: make writing to one an error."""
    array.flags.writeable = False
    return array
