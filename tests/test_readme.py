"""The README's "Make music" commands run as written, against the tiny release standing in for the
converted library (fewer denoising steps, and a narrow image for text-to-audio, to stay fast)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import soundfile

from riffusion import synth

README = Path(__file__).resolve().parents[1] / "README.md"


def music_commands() -> list[list[str]]:
    section = README.read_text().split("## Make music on Paddle", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [line.split("#", 1)[0] for line in block.splitlines()]
    return [shlex.split(line) for line in lines if " -m riffusion " in line]


def test_the_readme_music_commands_run(release, tmp_path):
    commands = music_commands()
    assert [command[3] for command in commands] == ["text-to-audio", "interpolate", "audio-to-image"]
    soundfile.write(tmp_path / "song.wav", synth.drum_loop().T, synth.SAMPLE_RATE)  # (channels, samples) -> frames
    faster = {"text-to-audio": ["--steps", "2", "--width", "64", "--runtime", "static"],
              "interpolate": ["--steps", "2", "--runtime", "static"]}
    for command in commands:
        args = [str(release) if arg == "riffusion-paddle" else arg for arg in command[1:]]
        result = subprocess.run([sys.executable, *args, *faster.get(command[3], [])], capture_output=True, text=True,
                                cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    for name in ("funk.mp3", "mix.wav", "song.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
