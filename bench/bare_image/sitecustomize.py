"""This machine's Python made to import like the GPU machine's bare image, for `bench/gpu_check.sh --bare-image`.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one; the check script puts
this folder first on PYTHONPATH, so every process (the driver and each Ray worker, which inherit PYTHONPATH) gets
an import hook that refuses a top-level module installed in this machine's site-packages unless its distribution is
in `packages.txt` (what the GPU image has). Modules under the folders named in KD_BARE_IMAGE_ALLOW (the unpacked
carry, the repository) and the standard library import as usual. So a package the carry forgot (pydantic, say) fails
here, with the name of what is missing, instead of in the few minutes of a GPU lease. Refusing is what the image
does: `try: import x / except ImportError` fallbacks take the same path as there. A package that both have but in
other versions can still differ: this machine's huggingface_hub, for one, wants httpx2, which the image's does not,
and transformers logs that it could not import it (harmless: no hub is used).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class BareImageFinder(importlib.abc.MetaPathFinder):
    def __init__(self, image: set[str], allowed_roots: list[str]):
        self.image = image
        self.allowed = [os.path.realpath(r) + os.sep for r in allowed_roots if r]
        self.dists = importlib.metadata.packages_distributions()  # top-level module -> distributions

    def find_spec(self, name, path=None, target=None):
        if path is not None or name in sys.builtin_module_names:
            return None  # submodules follow their package; builtins are the interpreter's
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is None:
            return None
        where = spec.origin if spec.origin not in (None, "namespace") else \
            next(iter(spec.submodule_search_locations or []), None)  # a namespace package: its first folder
        if where is None or any(os.path.realpath(where).startswith(r) for r in self.allowed):
            return None
        dists = self.dists.get(name)
        if not dists or any(_norm(d) in self.image for d in dists):
            return None  # the standard library, or a package the image has
        raise ModuleNotFoundError(f"No module named {name!r} (bare GPU image: {dists[0]} is not on the image and "
                                  f"the carry does not bring it; bench/gpu_carry.sh)", name=name)


def _install() -> None:
    listing = Path(__file__).with_name("packages.txt").read_text().splitlines()
    image = {_norm(line.strip()) for line in listing if line.strip() and not line.startswith("#")}
    roots = os.environ.get("KD_BARE_IMAGE_ALLOW", "").split(os.pathsep)
    sys.meta_path.insert(0, BareImageFinder(image, roots))


_install()
