"""Weight quantization for pruned models: grids (:mod:`.grid`), round to nearest (:mod:`.rtn`), GPTQ that keeps the
mask and SparseGPT's joint pruning + quantization (:mod:`.gptq`), ATP-scheduled bit widths (:mod:`.bits`), the
options (:mod:`.spec`) and honest sizes (:mod:`.sizes`). Reads calibration statistics; never runs the engine."""

from atprune.quant.bits import atp_bits, mean_bits, step_max
from atprune.quant.grid import Grid, find_params
from atprune.quant.spec import BITS, QuantSpec, check_group_widths, make_spec, parse_quantize

__all__ = ["BITS", "Grid", "QuantSpec", "atp_bits", "check_group_widths", "find_params", "make_spec", "mean_bits", "step_max",
           "parse_quantize"]
