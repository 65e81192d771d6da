"""llama.cpp's own HF-to-GGUF converter, at the commit the installed llama-cpp-python pins.

The converter is not on PyPI as a package of its own, but the llama-cpp-python source
distribution carries it (vendor/llama.cpp). `install_converter()` downloads that sdist
from the package registry with pip and extracts only the converter's files into the
Python environment, at install time (`make install` runs `python -m tasks.export.gguf_converter`). Nothing of
llama.cpp is copied into this repository.

Run as a script with `--run`, this module is also the converter's driver: it puts the
vendored gguf-py first on the path (the converter needs it, not PyPI's gguf), registers
extra BPE pre-tokenizer hashes the way llama.cpp's update script does (hash -> known
pre-tokenizer name, added to `get_vocab_base_pre`), and calls the converter's `main()`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from tasks.core.errors import UserFacingError

CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# The fixed text the converter hashes starts like this; the driver finds the full text in
# the converter's own code so the two can never drift apart.
CHKTXT_PREFIX = "\n \n\n \n\n\n \t"


class ConverterUnavailable(UserFacingError, RuntimeError):
    """The converter is not installed; the message says how to install it."""


def llama_cpp_version() -> str:
    return version("llama-cpp-python")


def converter_dir(root: Path | None = None) -> Path:
    """Inside the Python environment (it belongs to the installed llama-cpp-python), unless
    ``FINETUNE_CONVERTER_DIR`` names another root."""
    env = os.environ.get("FINETUNE_CONVERTER_DIR")
    base = root or (Path(env) if env else Path(sys.prefix) / "share" / "finetune-flow")
    return base / f"llama.cpp-converter-{llama_cpp_version()}"


def find_converter(root: Path | None = None) -> Path:
    path = converter_dir(root)
    if not (path / "convert_hf_to_gguf.py").exists():
        raise ConverterUnavailable(
            f"llama.cpp's converter for llama-cpp-python {llama_cpp_version()} is not installed in {path}; "
            "run `make install` (or `python -m tasks.export.gguf_converter`), which fetches it from the package registry"
        )
    return path


def install_converter(root: Path | None = None) -> Path:
    """Fetch the llama-cpp-python sdist with pip and keep only the converter's files."""
    target = converter_dir(root)
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={llama_cpp_version()}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        staged = Path(tmp) / "converter"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # <sdist root>/vendor/llama.cpp/<member>/...
                if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in CONVERTER_MEMBERS:
                    if member.isfile() or member.isdir():
                        member.name = str(Path(*parts[3:]))
                        tar.extract(member, staged, filter="data")
        if not (staged / "convert_hf_to_gguf.py").exists():
            raise ConverterUnavailable(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        staged.rename(target)
    return target


def _driver_main(argv: list[str]) -> None:
    """`python -m tasks.export.gguf_converter --run CONVERTER_DIR [HASH=NAME ...] -- CONVERTER_ARGS`."""
    from hashlib import sha256

    llama_dir = Path(argv[0]).resolve()
    sep = argv.index("--")
    extra = dict(a.split("=", 1) for a in argv[1:sep])
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    import convert_hf_to_gguf as converter  # noqa: PLC0415 (only importable after the path change)
    from conversion.base import TextModel  # noqa: PLC0415

    original = TextModel.get_vocab_base_pre
    chktxt = next(c for c in original.__code__.co_consts if isinstance(c, str) and c.startswith(CHKTXT_PREFIX))

    def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001, ANN202 (the converter's signature)
        chkhsh = sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()  # as the converter computes it
        if chkhsh in extra:
            converter.logger.info(f"chkhsh {chkhsh} registered by finetune-flow as {extra[chkhsh]!r}")
            return extra[chkhsh]
        return original(self, tokenizer)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), *argv[sep + 1 :]]
    converter.main()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        _driver_main(sys.argv[2:])
    else:
        print(install_converter())
