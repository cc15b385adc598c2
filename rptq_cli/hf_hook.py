"""Register rptq with transformers when transformers is imported, not when rptq_cli is.

Importing ``transformers.quantizers`` costs seconds; ``import rptq_cli`` (and so every ``rptq`` command,
``rptq --help`` included) must stay instant. :func:`install` puts a one-shot finder on ``sys.meta_path`` that
lets ``transformers.quantizers.auto`` load as usual and then imports :mod:`rptq_cli.hf_integration`, which
registers the ``rptq`` quantization method. Where transformers is already loaded it registers at once.
Inside the ``rptq`` CLI the registration is harmless: its loaders never pass an rptq checkpoint to
``from_pretrained`` (the FP loader refuses one first) and defining two classes costs microseconds.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

TRIGGER = "transformers.quantizers.auto"  # defines register_quantizer; modeling_utils imports it first thing
INTEGRATION = "rptq_cli.hf_integration"

# config.json's "transformers_weights" of an rptq checkpoint. Plain transformers (rptq not imported) reads it as
# the weights file to load and stops with a ValueError that quotes it, instead of loading the model unquantized
# with random weights; once rptq is registered, the quantizer clears it before transformers looks for files.
NEEDS_IMPORT = ("rptq checkpoint: run `import rptq_cli` before from_pretrained to load it (pip install the rptq "
                "package); without it transformers would load this model unquantized")


def _register() -> None:
    try:
        importlib.import_module(INTEGRATION)  # registers at import (a partial module when already importing)
    except Exception as exc:  # never break `import transformers` for someone who only imported rptq_cli
        warnings.warn(f"rptq could not register with transformers ({type(exc).__name__}: {exc}); "
                      "AutoModelForCausalLM.from_pretrained will refuse rptq checkpoints", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``TRIGGER`` through the other finders and registers rptq once the module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


_FINDER = _RegisterAfterImport()


def install() -> None:
    """Register now when transformers' quantizers are loaded, else as soon as they are."""
    if TRIGGER in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
