"""Vision-language models: prune only the language model's decoder blocks inside transformers' LLaVA, LLaVA-NeXT,
Qwen2-VL / Qwen2.5-VL, Gemma 3 and Idefics3 / SmolVLM classes (:mod:`.layout`), calibrate on text or on image-text
pairs run through the whole model with its processor (:mod:`.pairs`), check captions' log-likelihood
(:mod:`.caption`), load with the processor (:mod:`.loading`) and fingerprint the parts that stay dense
(:mod:`.dense`)."""
