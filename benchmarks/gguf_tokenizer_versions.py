"""Check each built-in alias's GGUF tokenizer under the transformers found on ``sys.path`` (issue 21).

Run once per candidate version, each installed into its own folder without dependencies::

    pip install --no-deps --target /tmp/tf-5.22.0 transformers==5.22.0
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/tf-5.22.0 python benchmarks/gguf_tokenizer_versions.py

Prints one JSON line per alias: versions, pass/fail, the problems, and the number of tokens of the first 20,000
characters of WikiText-2 test and a hash of their ids (``$ATPRUNE_DATA_DIR``, default ../shared/data).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from transformers import AutoTokenizer

from atprune.models.gguf_tokenizer import check_gguf_tokenizer
from atprune.models.sources import ALIASES, resolve_model

DATA = Path(os.environ.get("ATPRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    wiki = DATA / "wikitext-2-raw-v1" / "wiki.test.raw"
    text = wiki.read_text(encoding="utf-8")[:20000] if wiki.is_file() else None
    for alias in sys.argv[1:] or ALIASES:
        source = resolve_model(alias)
        folder, name = os.path.split(source.path)
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as err:  # an old transformers may not convert this tokenizer at all
            print(json.dumps({"alias": alias, "load_error": f"{type(err).__name__}: {err}"[:300]}), flush=True)
            continue
        check = check_gguf_tokenizer(tok, source.path)
        ids = tok(text)["input_ids"] if text else None
        sample = "Hello world, this is a test of the Gemma tokenizer."
        print(json.dumps({"alias": alias, "transformers": check.transformers, "tokenizers": check.tokenizers,
                          "ok": check.ok, "problems": list(check.problems),
                          "sample": tok.convert_ids_to_tokens(tok(sample)["input_ids"]),
                          "wiki_tokens_20000_chars": len(ids) if ids else None,
                          "wiki_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16] if ids else None},
                         ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
