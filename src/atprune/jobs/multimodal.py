"""The vision-language part of ``atprune prune``: checks before loading, loading with the processor, image-text
calibration, the caption check and the report's ``multimodal`` section (what stayed dense)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from atprune.errors import ConfigError
from atprune.models.sources import ModelSource, load_model
from atprune.multimodal.caption import caption_loglik
from atprune.multimodal.dense import DenseParts
from atprune.multimodal.layout import LAYOUTS
from atprune.multimodal.loading import check_image_text_calibration, is_vision_language_source, load_vision_language
from atprune.multimodal.pairs import Pair, image_text_calibration, is_pairs_file, read_pairs


@dataclass
class VisionLanguagePlan:
    """What :func:`check_vision_language` found: whether the model is vision-language, the image-text calibration
    pairs (empty: text calibration) and the caption pairs (empty: no caption check)."""

    vision_language: bool
    calib_pairs: list[Pair] = field(default_factory=list)
    caption_pairs: list[Pair] = field(default_factory=list)


def check_vision_language(source: ModelSource, calib_data: str | None, caption_data: str | None,
                          nsamples: int) -> VisionLanguagePlan:
    """Before any model is loaded: is ``source`` vision-language, and are its image-text files usable.

    Raises:
        ConfigError: image-text calibration or caption data for a text-only model; a pairs file with a missing
            or unreadable image or a malformed line (see :func:`atprune.multimodal.pairs.read_pairs`); caption
            data that is not an image-text file; an unsupported vision-language class.
    """
    if caption_data and not is_pairs_file(caption_data):
        raise ConfigError(f"--caption-data {caption_data}: not an image-text .jsonl (lines of {{\"image\": path, "
                          "\"text\": caption}})")
    pairs_calib = is_pairs_file(calib_data)
    for spec in (calib_data if pairs_calib else None, caption_data):
        if spec:
            check_image_text_calibration(source, spec)
    plan = VisionLanguagePlan(pairs_calib or bool(caption_data) or is_vision_language_source(source, strict=False))
    if pairs_calib:
        plan.calib_pairs = read_pairs(calib_data, limit=nsamples)
    if caption_data:
        plan.caption_pairs = read_pairs(caption_data)
    return plan


def check_trials_data(plan: VisionLanguagePlan, job, command: str) -> None:
    """``atprune search`` / ``compare`` on a vision-language model: the selection metric (held-out perplexity) and the
    evaluation are text perplexity of the language model, so with image-text calibration the held-out text must be
    named (``--select-data``, or search's ``--select-on-test``: the default, windows of the calibration source
    disjoint from the calibration samples, has no text windows to give), and neither selection nor evaluation data
    may be image-text pairs.

    Args:
        plan: :func:`check_vision_language`'s plan for the job's model and ``calib_data``.
        job: a job with :class:`atprune.jobs.options.RunOptions` and :class:`atprune.jobs.options.SelectionOptions`.
        command: ``"search"`` or ``"compare"`` (for the message).

    Raises:
        ConfigError: image-text calibration without text selection data, or image-text selection or evaluation
            data.
    """
    for flag, spec in (("--select-data", job.select_data), ("--eval-data", job.eval_data)):
        if is_pairs_file(spec):
            raise ConfigError(f"{flag} {spec} holds image-text pairs; {command} selects and evaluates on the language "
                              "model's text perplexity: give text data (c4, wikitext2, a text file)")
    if plan.calib_pairs and not (job.select_data or job.select_on_test):
        raise ConfigError(f"{command} with image-text calibration ({job.calib_data}) chooses beta on held-out text: "
                          "give --select-data (c4, wikitext2 or a text file)")


def with_offload(plan: VisionLanguagePlan, offload: bool) -> VisionLanguagePlan:
    """The plan for a run with ``--offload``: with text calibration (e.g. Gemma 3 27B on one GPU) a vision-language
    checkpoint takes the language-model path, as before vision-language support (loaded through
    ``AutoModelForCausalLM``; the processor is not saved); image-text calibration or captions are refused.

    Raises:
        ConfigError: ``offload`` with image-text calibration or caption data.
    """
    if not (plan.vision_language and offload):
        return plan
    if plan.calib_pairs or plan.caption_pairs:
        raise ConfigError("--offload is not supported with image-text calibration or --caption-data yet")
    return replace(plan, vision_language=False)


def load_for_trials(plan: VisionLanguagePlan, source: ModelSource, dtype, device, job, save_dtype=None):
    """``(vlm, model, tokenizer)`` for a job that prunes one model again and again (search, compare): a vision-language
    model loaded with its processor, the checksums of its dense parts taken (``vlm`` a :class:`VisionLanguageRun`,
    only its language blocks pruned), or a text model (``vlm`` None). ``job`` gives ``progress`` and
    ``allow_tokenizer_mismatch``; ``save_dtype``: the dtype the output will be saved in (None: as loaded).

    Raises:
        ConfigError: as :func:`atprune.models.sources.load_model` and :class:`VisionLanguageRun`.
    """
    if not plan.vision_language:
        model, tokenizer = load_model(source, dtype=dtype, device=device, progress=job.progress,
                                      allow_tokenizer_mismatch=job.allow_tokenizer_mismatch)
        return None, model, tokenizer
    vlm = VisionLanguageRun(plan, source, dtype, device, job.progress)
    vlm.before_pruning(save_dtype, score_dense=False)  # checksums of the dense parts, checked again at the end
    return vlm, vlm.model, vlm.tokenizer


class VisionLanguageRun:
    """One prune run of a vision-language model: load it with its processor, give the calibration, score captions
    and record what stayed dense."""

    def __init__(self, plan: VisionLanguagePlan, source: ModelSource, dtype, device, progress: bool):
        self.plan = plan
        self.model, self.processor = load_vision_language(source, dtype=dtype, device=device, progress=progress)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.dense: DenseParts | None = None
        self.captions: dict = {"dense": None, "sparse": None}
        self.timings: dict[str, float] = {}

    def calibration(self, max_text_tokens: int):
        """The image-text calibration (None: text calibration as for a language model)."""
        if not self.plan.calib_pairs:
            return None
        return image_text_calibration(self.processor, self.plan.calib_pairs, max_text_tokens,
                                      source=str(self.plan.calib_pairs[0].image.parent))

    def before_pruning(self, save_dtype, score_dense: bool = True) -> None:
        """Fingerprint the dense parts (in ``save_dtype``, None: the model's) and score the captions."""
        self.dense = DenseParts(self.model, save_dtype)
        if self.plan.caption_pairs and score_dense:
            self._score("dense")

    def after_pruning(self) -> None:
        if self.plan.caption_pairs:
            self._score("sparse")

    def _score(self, tag: str) -> None:
        t = time.perf_counter()
        self.captions[tag] = caption_loglik(self.model, self.processor, self.plan.caption_pairs)
        self.timings[f"caption_{tag}"] = time.perf_counter() - t

    def report(self) -> dict:
        """The report's ``multimodal`` section: class, language blocks, per dense part its checksums before and
        after pruning (``unchanged``), and the caption check."""
        layout = LAYOUTS[type(self.model).__name__]
        return {"class": type(self.model).__name__, "processor": type(self.processor).__name__,
                "language_blocks": layout.blocks, "dense_parts": self.dense.report() if self.dense else None,
                "caption_loglik": self.captions if self.plan.caption_pairs else None}

    def warnings(self) -> list[str]:
        changed = [p for p, r in (self.dense.report() if self.dense else {}).items() if not r["unchanged"]]
        return [f"DENSE PARTS CHANGED BY PRUNING: {', '.join(changed)}"] if changed else []
