"""GPT-2 residual-stream activations on GSM8K -> sparse autoencoders, as a reproducible pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gsm8k-sae-pipeline")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+source"
