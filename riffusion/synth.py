"""Small deterministic synthesizers: test signals and seed material, float32 [1, samples] in [-1, 1].

The default tempo, 93.75 BPM, makes one beat 0.64 s, so 5.12 s (one 512-column image) holds exactly
two measures of 4/4.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

SAMPLE_RATE = 44100
CLIP_SECONDS = 5.12
BPM = 93.75

# I-vi-IV-V in C major, MIDI note numbers: a bass note and a triad, two beats each.
POP_PROGRESSION = (
    (48, 60, 64, 67),  # C
    (45, 57, 60, 64),  # Am
    (41, 57, 60, 65),  # F
    (43, 55, 59, 62),  # G
)


def midi_to_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def num_samples(duration_s: float, sample_rate: int) -> int:
    return int(round(duration_s * sample_rate))


def tone(frequency_hz: float, duration_s: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE,
         amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(num_samples(duration_s, sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)[None]


def adsr(length: int, sample_rate: int, attack_s: float = 0.01, decay_s: float = 0.1,
         sustain: float = 0.7, release_s: float = 0.1) -> np.ndarray:
    """Attack-decay-sustain-release envelope that ends at zero after `length` samples."""
    attack, decay, release = (num_samples(s, sample_rate) for s in (attack_s, decay_s, release_s))
    hold = max(length - attack - decay - release, 0)
    envelope = np.concatenate([
        np.linspace(0, 1, attack, endpoint=False),
        np.linspace(1, sustain, decay, endpoint=False),
        np.full(hold, sustain),
        np.linspace(sustain, 0, release),
    ])
    return envelope[:length]


def saw(frequency_hz: float, length: int, sample_rate: int, max_harmonic_hz: float = 8000.0) -> np.ndarray:
    """Band-limited sawtooth: its first harmonics (1/k amplitudes) below max_harmonic_hz."""
    t = np.arange(length) / sample_rate
    harmonics = range(1, int(max_harmonic_hz // frequency_hz) + 1)
    return sum(np.sin(2 * np.pi * k * frequency_hz * t) / k for k in harmonics) * (2 / np.pi)


def chord_progression(duration_s: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE, bpm: float = BPM,
                      chords=POP_PROGRESSION, beats_per_chord: int = 2) -> np.ndarray:
    """Chords cycling every `beats_per_chord` beats: a sine bass under sawtooth chord tones."""
    out = np.zeros(num_samples(duration_s, sample_rate))
    chord_length = num_samples(60.0 / bpm * beats_per_chord, sample_rate)
    envelope = adsr(chord_length, sample_rate)
    t = np.arange(chord_length) / sample_rate
    for index, start in enumerate(range(0, len(out), chord_length)):
        bass, *upper = chords[index % len(chords)]
        voice = np.sin(2 * np.pi * midi_to_hz(bass) * t)
        voice += sum(0.4 * saw(midi_to_hz(note), chord_length, sample_rate) for note in upper)
        segment = (voice * envelope)[: len(out) - start]
        out[start:start + len(segment)] += segment
    return _normalize(out)


def kick(sample_rate: int, duration_s: float = 0.35) -> np.ndarray:
    """A sine whose pitch falls from 150 Hz to 45 Hz, with an exponential decay."""
    t = np.arange(num_samples(duration_s, sample_rate)) / sample_rate
    frequency = 45 + 105 * np.exp(-t / 0.04)
    phase = 2 * np.pi * np.cumsum(frequency) / sample_rate
    return np.sin(phase) * np.exp(-t / 0.12)


def filtered_noise(rng: np.random.Generator, sample_rate: int, duration_s: float, band_hz: tuple[float, float],
                   decay_s: float) -> np.ndarray:
    t = np.arange(num_samples(duration_s, sample_rate)) / sample_rate
    sos = signal.butter(4, band_hz, btype="bandpass", fs=sample_rate, output="sos")
    return signal.sosfilt(sos, rng.standard_normal(len(t))) * np.exp(-t / decay_s)


def drum_loop(duration_s: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE, bpm: float = BPM,
              seed: int = 0) -> np.ndarray:
    """Kick on beats 1 and 3, snare (noise plus a 185 Hz body) on 2 and 4, closed hats on eighths."""
    rng = np.random.default_rng(seed)
    out = np.zeros(num_samples(duration_s, sample_rate))
    beat = 60.0 / bpm
    t = np.arange(num_samples(0.2, sample_rate)) / sample_rate
    snare = 2.5 * filtered_noise(rng, sample_rate, 0.2, (1000, 6000), 0.05)
    snare += 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.04)
    hat = 4.0 * filtered_noise(rng, sample_rate, 0.06, (6000, 9500), 0.015)
    kick_sound = kick(sample_rate)
    for eighth in range(int(duration_s / beat * 2 + 1e-9)):
        position = eighth * beat / 2
        _mix_in(out, hat, position, sample_rate)
        if eighth % 4 == 0:
            _mix_in(out, kick_sound, position, sample_rate)
        elif eighth % 4 == 2:
            _mix_in(out, snare, position, sample_rate)
    return _normalize(out)


def _mix_in(out: np.ndarray, sound: np.ndarray, position_s: float, sample_rate: int) -> None:
    start = num_samples(position_s, sample_rate)
    end = min(start + len(sound), len(out))
    out[start:end] += sound[: end - start]


def _normalize(waveform: np.ndarray, peak: float = 0.8) -> np.ndarray:
    return (waveform * (peak / np.max(np.abs(waveform)))).astype(np.float32)[None]
