"""Model-family adapters: one small declarative file per family."""
from . import llama, opt  # noqa: F401  (registers the families)
from .base import Family, family_for, supported_architectures  # noqa: F401
