"""Calibration and evaluation data: text sources (:mod:`.text`) and the token windows cut from them
(:mod:`.windows`). Later: images and image-text pairs, each in a module of its own."""

from atprune.data.text import (C4_FILES, NAMES, TEXT_SUFFIXES, WIKITEXT_FILES, TextSource, check_available,
                               check_readable, default_data_dir, eval_split, identity, load_text, wikitext_rows)
from atprune.data.windows import (EvalSet, TokenWindows, bos_policy, calibration_windows, cut_windows, eval_set,
                                  evaluation_tokens, sample_windows, token_stream, window_bos)

__all__ = ["C4_FILES", "EvalSet", "NAMES", "TEXT_SUFFIXES", "TextSource", "TokenWindows", "WIKITEXT_FILES",
           "bos_policy", "calibration_windows", "check_available", "check_readable", "cut_windows", "default_data_dir",
           "eval_split", "eval_set", "evaluation_tokens", "identity", "load_text", "sample_windows", "token_stream",
           "wikitext_rows", "window_bos"]
