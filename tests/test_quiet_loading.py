"""--quiet reaches transformers' loading bars, including the GGUF converter's plain tqdm."""

import transformers.modeling_gguf_pytorch_utils as gguf_utils
import transformers.utils.logging as hf_logging

from atprune.models.sources import _loading_bars


def test_loading_bars_off_then_restored():
    before = gguf_utils.tqdm
    assert hf_logging.is_progress_bar_enabled()
    with _loading_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
        bar = gguf_utils.tqdm(range(3))
        assert bar.disable
        assert list(bar) == [0, 1, 2]
    assert gguf_utils.tqdm is before and hf_logging.is_progress_bar_enabled()
    with _loading_bars(True):
        assert gguf_utils.tqdm is before and hf_logging.is_progress_bar_enabled()
