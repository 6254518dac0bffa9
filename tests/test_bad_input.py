"""Bad input: one clear line naming the file (and tensor), exit 1, nothing at --out."""

import json
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path
import sys

import pytest
import torch

from convert.cli import main

UNET_BIN = "unet/diffusion_pytorch_model.bin"


def convert_fails(src, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["--src", str(src), "--out", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"
    return error


def edit_state(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_component_folder(repo_copy, tmp_path, capsys):
    import shutil

    shutil.rmtree(repo_copy / "vae")
    assert f"{repo_copy / 'vae'}: component folder missing" in convert_fails(repo_copy, tmp_path, capsys)


def test_missing_weight_file(repo_copy, tmp_path, capsys):
    (repo_copy / UNET_BIN).unlink()
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / 'unet'}: no weight file" in error


def test_truncated_weight_file(repo_copy, tmp_path, capsys):
    path = repo_copy / UNET_BIN
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{path}: not a readable torch file (truncated or corrupted?)" in error


def test_truncated_safetensors_file(tmp_path, capsys):
    from convert.builtin import build

    src = build(tmp_path / "st", size="tiny", weights="safetensors")
    path = src / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert f"{path}: not a readable safetensors file" in convert_fails(src, tmp_path, capsys)


def test_corrupted_weight_file(repo_copy, tmp_path, capsys):
    path = repo_copy / "vae" / "diffusion_pytorch_model.bin"
    data = bytearray(path.read_bytes())
    data[:4096] = os.urandom(4096)  # the zip's first entry header and data.pkl
    data[-2048:] = os.urandom(2048)  # and its central directory
    path.write_bytes(bytes(data))
    assert f"{path}: not a readable torch file" in convert_fails(repo_copy, tmp_path, capsys)


def test_tensor_shape_disagrees_with_config(repo_copy, tmp_path, capsys):
    name = "conv_in.weight"
    edit_state(repo_copy / UNET_BIN, lambda s: s.__setitem__(name, torch.zeros(16, 4, 3, 3)))
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / UNET_BIN}: tensor 'conv_in.weight': shape [16, 4, 3, 3] disagrees with unet/config.json" in error
    assert "[32, 4, 3, 3]" in error


def test_unknown_key(repo_copy, tmp_path, capsys):
    edit_state(repo_copy / UNET_BIN, lambda s: s.__setitem__("lora_up.weight", torch.zeros(4, 4)))
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / UNET_BIN}: tensor 'lora_up.weight': unknown tensor" in error


def test_missing_tensor(repo_copy, tmp_path, capsys):
    edit_state(repo_copy / UNET_BIN, lambda s: s.pop("conv_out.bias"))
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert "1 tensor(s) missing from the weights, first 'conv_out.bias'" in error


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_never_executed(repo_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = repo_copy / "text_encoder" / "pytorch_model.bin"
    torch.save({"text_model.embeddings.token_embedding.weight": RunsCode(marker)}, path, pickle_module=pickle)
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{path}: refused to unpickle, the file holds more than tensors" in error
    assert not marker.exists()


def test_unknown_pipeline_type(repo_copy, tmp_path, capsys):
    index = json.loads((repo_copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (repo_copy / "model_index.json").write_text(json.dumps(index))
    assert "unknown model type 'StableDiffusionXLPipeline'" in convert_fails(repo_copy, tmp_path, capsys)


def test_unknown_component_class(repo_copy, tmp_path, capsys):
    index = json.loads((repo_copy / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (repo_copy / "model_index.json").write_text(json.dumps(index))
    assert "unknown model type diffusers.UNet3DConditionModel for part 'unet'" in convert_fails(repo_copy, tmp_path, capsys)


def test_broken_config_json(repo_copy, tmp_path, capsys):
    (repo_copy / "unet" / "config.json").write_text("{not json")
    assert f"{repo_copy / 'unet' / 'config.json'}: not valid JSON" in convert_fails(repo_copy, tmp_path, capsys)


def test_source_that_does_not_exist(tmp_path, capsys):
    assert "no such folder, and not a Hub repo id" in convert_fails(tmp_path / "nowhere", tmp_path, capsys)


def test_command_line_exit_status(repo_copy, tmp_path):
    (repo_copy / UNET_BIN).unlink()
    result = subprocess.run([sys.executable, "-m", "convert", "--src", str(repo_copy), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {repo_copy / 'unet'}: no weight file")
    assert not (tmp_path / "out").exists()


def test_legacy_non_zip_pickle_gets_a_clear_error(repo_copy, tmp_path, capsys):
    path = repo_copy / UNET_BIN
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert f"{path}: legacy (pre-zip) torch pickle" in convert_fails(repo_copy, tmp_path, capsys)


@pytest.mark.parametrize("out", ["same", "dotdot", "symlink", "parent"])
def test_output_overlapping_the_source_is_refused_even_with_overwrite(repo_copy, tmp_path, capsys, out):
    (tmp_path / "link").symlink_to(repo_copy)
    target = {"same": repo_copy, "dotdot": tmp_path / "x" / ".." / repo_copy.name,
              "symlink": tmp_path / "link", "parent": tmp_path}[out]
    before = sorted(p.name for p in repo_copy.rglob("*"))
    assert main(["--src", str(repo_copy), "--out", str(target), "--overwrite", "--quiet"]) == 1
    assert "overlaps the source" in capsys.readouterr().err
    assert sorted(p.name for p in repo_copy.rglob("*")) == before


# Links, devices and FIFOs: a source's files are read only where they are regular files inside the source
# (or, for a Hugging Face cache snapshot, inside its cached repo); nothing from outside reaches the output.

SECRET = "top-secret-token-4f1e"


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


def no_secret_in(folder):
    return not any(SECRET.encode() in path.read_bytes() for path in folder.rglob("*") if path.is_file())


def test_only_the_files_a_weightless_part_needs_are_copied(repo_copy, tmp_path, secret):
    """tokenizer/notes.txt -> /outside/secret (and a plain extra file) are not carried into the library."""
    from convert.library import convert_library

    (repo_copy / "tokenizer" / "notes.txt").symlink_to(secret)
    (repo_copy / "scheduler" / "README.md").write_text("extra")
    out = tmp_path / "out"
    convert_library(str(repo_copy), out, quiet=True)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert [p.name for p in (out / "scheduler").iterdir()] == ["scheduler_config.json"]
    assert no_secret_in(out)


@pytest.mark.parametrize("where", ["tokenizer/vocab.json", "scheduler/scheduler_config.json",
                                   "feature_extractor/preprocessor_config.json", "unet/config.json", UNET_BIN,
                                   "model_index.json"])
def test_a_file_linking_outside_the_source_is_refused(repo_copy, tmp_path, capsys, where):
    """A link whose target lies outside the source folder is never read, whichever file it is."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / Path(where).name
    (repo_copy / where).rename(target)
    (repo_copy / where).symlink_to(target)
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / where}: leads outside {repo_copy.resolve()}" in error


def test_a_linked_part_folder_leaving_the_source_is_refused(repo_copy, tmp_path, capsys, secret):
    outside = tmp_path / "outside-tokenizer"
    (repo_copy / "tokenizer").rename(outside)
    (outside / "vocab.json").unlink()
    (outside / "vocab.json").symlink_to(secret)  # would not even be JSON-checked: it is copied verbatim
    (repo_copy / "tokenizer").symlink_to(outside, target_is_directory=True)
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / 'tokenizer'}: leads outside" in error


def test_links_inside_the_source_are_followed(repo_copy, tmp_path):
    """A link to another file of the same source (as in a Hub cache or a deduplicated clone) is fine."""
    from convert.library import convert_library

    store = repo_copy / "store"
    store.mkdir()
    (repo_copy / "tokenizer" / "merges.txt").rename(store / "merges.txt")
    (repo_copy / "tokenizer" / "merges.txt").symlink_to(Path("..") / "store" / "merges.txt")
    out = tmp_path / "out"
    convert_library(str(repo_copy), out, quiet=True)
    assert (out / "tokenizer" / "merges.txt").read_bytes() == (store / "merges.txt").read_bytes()
    assert not (out / "tokenizer" / "merges.txt").is_symlink()


def test_a_link_to_dev_zero_is_refused(repo_copy, tmp_path, capsys):
    (repo_copy / "tokenizer" / "merges.txt").unlink()
    (repo_copy / "tokenizer" / "merges.txt").symlink_to("/dev/zero")
    assert f"{repo_copy / 'tokenizer' / 'merges.txt'}: leads outside" in convert_fails(repo_copy, tmp_path, capsys)


@pytest.mark.parametrize("where", ["tokenizer/merges.txt", "unet/config.json", "model_index.json", UNET_BIN])
def test_a_fifo_in_the_source_is_refused_not_read(repo_copy, tmp_path, capsys, where):
    """Opening a FIFO would block forever; it is refused before any read."""
    (repo_copy / where).unlink()
    os.mkfifo(repo_copy / where)
    assert f"{repo_copy / where}: not a regular file" in convert_fails(repo_copy, tmp_path, capsys)


def test_a_dangling_link_in_the_source_is_named(repo_copy, tmp_path, capsys):
    (repo_copy / "unet" / "config.json").unlink()
    (repo_copy / "unet" / "config.json").symlink_to(repo_copy / "nowhere.json")
    assert f"{repo_copy / 'unet' / 'config.json'}: a dangling link" in convert_fails(repo_copy, tmp_path, capsys)


def test_a_shard_index_naming_a_file_outside_the_source_is_refused(repo_copy, tmp_path, capsys, secret):
    index = repo_copy / "unet" / "diffusion_pytorch_model.bin.index.json"
    (repo_copy / UNET_BIN).unlink()
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../secret.txt"}}))
    assert f"{repo_copy / 'unet' / '../../secret.txt'}: leads outside" in convert_fails(repo_copy, tmp_path, capsys)


# Corrupt zip records of a .bin / .ckpt: the memory map reads storages straight from the file, so each
# record is checked (stored, long enough, inside the file) before any tensor is read.

def rewrite_archive(path, first, compression=zipfile.ZIP_STORED, shorten=0):
    """Re-save `path` with tensor `first` first (so it owns record data/0), then rewrite the archive
    with `compression`, data/0 cut short by `shorten` bytes."""
    state = torch.load(path, weights_only=True)
    torch.save({first: state.pop(first), **state}, path)
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in records:
            archive.writestr(name, data[: len(data) - shorten] if name.endswith("/data/0") else data)


def test_a_deflate_compressed_record_is_refused(repo_copy, tmp_path, capsys):
    """torch.load reads such a file, but a memory map would read the compressed bytes as weights."""
    path = repo_copy / UNET_BIN
    rewrite_archive(path, "conv_in.weight", zipfile.ZIP_DEFLATED)
    assert torch.equal(torch.load(path, weights_only=True)["conv_in.weight"],
                       torch.load(repo_copy.parent / "damaged" / UNET_BIN, weights_only=True)["conv_in.weight"])
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{path}: tensor 'conv_in.weight': record " in error and "/data/0 is compressed" in error


def test_a_record_shorter_than_its_storage_is_refused(repo_copy, tmp_path, capsys):
    """torch.load refuses such a file; a memory map would read the next record's bytes as weights."""
    path = repo_copy / UNET_BIN
    needed = torch.load(path, weights_only=True)["conv_in.weight"].nbytes
    rewrite_archive(path, "conv_in.weight", shorten=64)
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{path}: tensor 'conv_in.weight': record " in error
    assert f"/data/0 holds {needed - 64} bytes, the tensor's storage needs {needed}" in error


def central_directory_entry(data: bytes, name: str) -> int:
    """Offset of the central directory header of record `name` in the zip bytes `data`."""
    at = data.index(b"PK\x05\x06")  # end of central directory record: where the directory starts
    at = struct.unpack_from("<I", data, at + 16)[0]
    while data[at:at + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46: at + 46 + name_length].decode() == name:
            return at
        at += 46 + name_length + extra_length + comment_length
    raise AssertionError(f"no record {name}")


def test_a_record_reaching_past_the_end_of_the_file_is_refused(repo_copy, tmp_path, capsys):
    """Out of bounds: the archive's directory gives data/0 a size past the end of the file (torch's reader
    refuses this one itself; the test keeps it that way: one line, nothing written)."""
    path = repo_copy / UNET_BIN
    rewrite_archive(path, "conv_in.weight")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(info.filename for info in archive.infolist() if info.filename.endswith("/data/0"))
    entry = central_directory_entry(data, name)
    huge = len(data) + 4096
    data[entry + 20: entry + 28] = struct.pack("<II", huge, huge)  # its stored and full size
    path.write_bytes(bytes(data))
    assert f"{path}: not a readable torch file (truncated or corrupted?)" in convert_fails(repo_copy, tmp_path, capsys)


def test_a_ckpt_with_a_short_record_is_refused(tmp_path, capsys):
    """Single-file sources are read the same way."""
    from convert.builtin import build
    from convert.single_file import write_single_file

    library = build(tmp_path / "repo", size="tiny")
    ckpt = tmp_path / "model.ckpt"
    write_single_file(str(library), ckpt, quiet=True)
    with zipfile.ZipFile(ckpt) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(ckpt, "w") as archive:
        for name, data in records:
            archive.writestr(name, data[:-8] if name.endswith("/data/3") else data)
    error = convert_fails(ckpt, tmp_path, capsys)
    assert f"{ckpt}: tensor '" in error and "/data/3 holds" in error


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("part, key, value", [("unet", "layers_per_block", 10**5), ("vae", "layers_per_block", 10**9),
                                              ("text_encoder", "num_hidden_layers", 10**6),
                                              ("text_encoder", "vocab_size", 10**12),
                                              ("unet", "block_out_channels", [32] * 10**4)])
def test_an_absurd_config_is_refused_before_building_the_model(repo_copy, tmp_path, capsys, part, key, value):
    """The weight files bound what a config may describe: refused at once, naming the value."""
    import time

    edit_json(repo_copy / part / "config.json", lambda config: config.__setitem__(key, value))
    started = time.perf_counter()
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert time.perf_counter() - started < 20
    assert f"{repo_copy / part / 'config.json'}: {key} " in error and "is more than the weight files can hold" in error


def test_an_absurd_config_for_a_single_file_source_is_refused(tmp_path, capsys):
    from convert.builtin import build
    from convert.single_file import write_single_file

    repo = build(tmp_path / "repo", size="tiny")
    single = tmp_path / "model.safetensors"
    write_single_file(str(repo), single, quiet=True)
    edit_json(repo / "unet" / "config.json", lambda config: config.__setitem__("layers_per_block", 10**7))
    assert main(["--src", str(single), "--config", str(repo), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "layers_per_block 10000000 (x 4 levels) is more than the weight files can hold" in capsys.readouterr().err


@pytest.mark.parametrize("edit, expected", [
    (lambda index: index.__setitem__("unet", "diffusers"), "entry 'unet' should be [library, class]"),
    (lambda index: index.__setitem__("tokenizer", ["transformers", 5]), "entry 'tokenizer' should be [library, class]"),
    (lambda index: index.__setitem__("scheduler", [["diffusers"], "PNDMScheduler"]), "entry 'scheduler' should be"),
    (lambda index: index.__setitem__("_class_name", ["StableDiffusionPipeline"]), "unknown model type"),
    (lambda index: index.__setitem__("scheduler", ["diffusers", "StableDiffusionPipeline"]),
     "scheduler diffusers.StableDiffusionPipeline is not a scheduler class"),
])
def test_model_index_entries_of_the_wrong_type(repo_copy, tmp_path, capsys, edit, expected):
    edit_json(repo_copy / "model_index.json", edit)
    assert expected in convert_fails(repo_copy, tmp_path, capsys)


def test_deeply_nested_json_is_one_line(repo_copy, tmp_path, capsys):
    (repo_copy / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert f"{repo_copy / 'unet' / 'config.json'}: not a config (JSON nested too deeply)" in convert_fails(repo_copy, tmp_path, capsys)


@pytest.mark.parametrize("repo_id", ["org/--name", "org/name.git", "org/name-", "org/na..me"])
def test_hub_ids_are_validated_as_the_hub_does(tmp_path, capsys, repo_id):
    """Both convert --src and convert.publish --repo-id refuse what the Hub would refuse."""
    from convert.publish import main as publish_main

    assert f"{repo_id}: no such folder, and not a valid Hub repo id" in convert_fails(repo_id, tmp_path, capsys)
    (tmp_path / "release").mkdir()
    assert publish_main(["--folder", str(tmp_path / "release"), "--repo-id", repo_id, "--dry-run"]) == 1
    assert f"--repo-id {repo_id!r}: not a valid Hub repo id" in capsys.readouterr().err


def test_a_model_that_fails_to_load_during_parity_is_one_line(repo_copy, tmp_path, capsys, monkeypatch):
    """diffusers/transformers raise OSError for a model they cannot load (here: the torch tokenizer)."""
    import transformers

    def unreadable(*args, **kwargs):
        raise OSError("Can't load tokenizer for '/x'. If you were trying to load it from 'https://huggingface.co'...")

    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", unreadable)
    assert main(["--src", str(repo_copy), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after parity's progress lines
    assert last.startswith("error: parity: a model could not be loaded: Can't load tokenizer"), last
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_single_file_keeps_a_yaml_it_did_not_write(torch_repo, tmp_path, capsys):
    """--out FILE also writes FILE's .yaml: an existing one is refused like the file (and left alone)."""
    from convert.single_file import main as single_main

    out = tmp_path / "model.safetensors"
    (tmp_path / "model.yaml").write_text("mine")
    assert single_main(["--src", str(torch_repo), "--out", str(out), "--quiet"]) == 1
    assert f"{tmp_path / 'model.yaml'}: exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (tmp_path / "model.yaml").read_text() == "mine" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]
    assert single_main(["--src", str(torch_repo), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert "model:" in (tmp_path / "model.yaml").read_text() and out.is_file()


def hub_cache_snapshot(repo, cache):
    """`repo` laid out as huggingface_hub caches it: snapshots/<commit>/... links into ../../blobs/."""
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    blobs = cache / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    for path in sorted(repo.rglob("*")):
        if path.is_file():
            relative = path.relative_to(repo)
            blob = blobs / "-".join(relative.parts)
            path.rename(blob)
            link = snapshot / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_hub_cache_snapshot_reads_its_blobs_but_nothing_outside_the_cached_repo(repo_copy, tmp_path, capsys, secret):
    from convert.library import convert_library

    snapshot = hub_cache_snapshot(repo_copy, tmp_path / "hub")
    convert_library(str(snapshot), tmp_path / "ok", quiet=True)
    assert (tmp_path / "ok" / "unet" / "diffusion_paddle_model.safetensors").is_file()
    vocab = snapshot / "tokenizer" / "vocab.json"
    vocab.unlink()
    vocab.symlink_to(secret)
    assert f"{vocab}: leads outside {(tmp_path / 'hub' / 'models--org--tiny').resolve()}" in \
        convert_fails(snapshot, tmp_path, capsys)


def test_single_file_from_a_library_refuses_a_weight_linking_outside(paddle_library, tmp_path, capsys):
    import shutil

    from convert.single_file import main as single_main

    library = shutil.copytree(paddle_library, tmp_path / "library")
    weights = library / "vae" / "diffusion_paddle_model.safetensors"
    weights.rename(tmp_path / "outside.safetensors")
    weights.symlink_to(tmp_path / "outside.safetensors")
    assert single_main(["--src", str(library), "--out", str(tmp_path / "model.safetensors"), "--quiet"]) == 1
    assert f"{weights}: leads outside {library.resolve()}" in capsys.readouterr().err


def test_a_loop_of_links_in_the_source_is_named(repo_copy, tmp_path, capsys):
    config = repo_copy / "unet" / "config.json"
    config.unlink()
    config.symlink_to(repo_copy / "unet" / "other.json")
    (repo_copy / "unet" / "other.json").symlink_to(config)
    assert f"{config}: a loop of links" in convert_fails(repo_copy, tmp_path, capsys)
