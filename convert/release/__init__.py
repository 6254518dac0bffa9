"""The Hub release of a converted model, one module per step:

    assemble.py      build_release: library, single file, exports, seed images, card and manifest in one folder
    card.py          the release's README.md, MODEL_CARD.md filled in from what the release holds and checked
    manifest.py      manifest.json: every file's sha256 and size; checking a folder against it
    verify.py        python -m convert.verify: a release folder (or a Hub download) against its manifest
    publish.py       python -m convert.publish: upload a verified release to the Hub
"""

from convert.release.assemble import build_release, describe_source

__all__ = ["build_release", "describe_source"]
