"""python -m convert.publish FOLDER --repo-id ORG/NAME: upload a verified release folder to the Hub.

The folder must pass `python -m convert.verify` (files against manifest.json) or nothing is sent.
The repo is created if needed; files go up with huggingface_hub's resumable large-folder upload
(run the same command again to resume an interrupted one). The token comes from the usual places:
HF_TOKEN, or `huggingface-cli login`. `--dry-run` verifies and prints what would be uploaded,
touching no network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.errors import ConversionError
from convert.release.manifest import MANIFEST_NAME, read_manifest
from convert.source import hub_id_problem, hub_unreachable
from convert.release.verify import add_release_folder, release_folder, verify_release
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party


def publish(folder: Path, repo_id: str, revision: str | None = None, private: bool = False,
            dry_run: bool = False) -> list[str]:
    """Verify `folder`, then upload it to `repo_id`; returns the uploaded file names."""
    folder = Path(folder)
    problem = hub_id_problem(repo_id)
    if problem:
        raise ConversionError(f"--repo-id {repo_id!r}: not a valid Hub repo id ({problem})")
    verdict = verify_release(folder, quiet=True)
    if not verdict["passed"]:
        problems = [f"{kind} {', '.join(names)}" for kind, names in verdict["files"].items()
                    if kind != "checked" and names]
        problems += [f"failed checks {', '.join(verdict['recorded_parity_failures'])}"] if verdict["recorded_parity_failures"] else []
        raise ConversionError(f"{folder}: fails verify ({'; '.join(problems)}): refusing to publish")

    manifest = read_manifest(folder)
    names = sorted(manifest["files"]) + [MANIFEST_NAME]
    total = sum(entry["bytes"] for entry in manifest["files"].values()) + (folder / MANIFEST_NAME).stat().st_size
    target = f"{repo_id} ({'private' if private else 'public'}), revision {revision or 'main'}"
    print(f"{folder}: verified, {len(names)} files, {total / 1e9:.2f} GB -> {target}")
    if manifest.get("repo_id") != repo_id:
        print(f"warning: the model card was written for {manifest.get('repo_id')!r}; rebuild the release with "
              f"--repo-id {repo_id} for its loading instructions to name this repo", file=sys.stderr)
    if dry_run:
        for name in names:
            size = (folder / name).stat().st_size
            print(f"  {size:>14,d}  {name}")
        print("dry run: nothing uploaded")
        return names
    _upload(folder, repo_id, revision, private, names)
    print(f"published https://huggingface.co/{repo_id}/tree/{revision or 'main'}")
    return names


def _upload(folder: Path, repo_id: str, revision: str | None, private: bool, names: list[str]) -> None:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HfHubHTTPError
    from requests.exceptions import ConnectionError, Timeout

    token = get_token()
    if not token:
        raise ConversionError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        # only the manifest's files: a stray file in the folder is never sent
        api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                private=private, allow_patterns=names)
    except (ConnectionError, Timeout) as error:  # OfflineModeIsEnabled (HF_HUB_OFFLINE=1) is one too
        raise ConversionError(f"{repo_id}: {hub_unreachable(error)}; nothing uploaded") from None
    except HfHubHTTPError as error:
        raise ConversionError(f"{repo_id}: Hub request failed: {str(error).splitlines()[0]}") from None


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.publish", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=HelpFormatter)
    add_version(parser)
    add_release_folder(parser, "a release folder (python -m convert --release)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--revision", help="branch to upload to (created if needed; default: main)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="verify and list what would be uploaded; no network")
    args = parser.parse_args(argv)
    args.folder = release_folder(parser, args)
    quiet_third_party()
    publish(args.folder, args.repo_id, args.revision, args.private, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
