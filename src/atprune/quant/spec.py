"""What to quantize to: :class:`QuantSpec` and the checks of the quantization options (one-line ConfigErrors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from atprune.errors import ConfigError

BITS = (2, 3, 4, 5, 6, 7, 8)  # code widths the quantizers support (compressed-tensors packs 1..8)
METHODS = ("gptq", "rtn")
BITS_ALLOCATIONS = ("uniform", "atp")
DEFAULT_CHOICES = (2, 3, 4, 8)


def parse_quantize(text: str) -> int:
    """``"w4"`` -> 4 (weight-only, 16-bit activations).

    Raises:
        ConfigError: anything but ``wN`` with N in :data:`BITS`.
    """
    t = str(text).strip().lower()
    if t.startswith("w") and t[1:].isdigit() and int(t[1:]) in BITS:
        return int(t[1:])
    raise ConfigError(f"--quantize takes wN with N in {{{', '.join(map(str, BITS))}}} (e.g. w4, w8), got {text!r}")


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization request.

    Attributes:
        bits: code width of a uniform schedule (the mean for ``bits_allocation="atp"``).
        group_size: columns per group, or None (per output channel).
        symmetric: symmetric (zero point ``2^(bits-1)``) or asymmetric grid.
        method: ``gptq`` (Hessian error feedback) or ``rtn`` (round to nearest).
        bits_allocation: ``uniform`` or ``atp`` (bits per block by :func:`atprune.quant.bits.atp_bits`).
        bits_mean: target parameter-weighted mean of bits (``atp``); bits_step: the schedule's step (bits per block).
        bits_choices: bit widths a block may get (``atp``).
        percdamp: GPTQ's Hessian damping (fraction of the mean diagonal, default 0.01).
        blocksize: GPTQ's lazy-update block (default 128).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    method: str = "gptq"
    bits_allocation: str = "uniform"
    bits_mean: float | None = None
    bits_step: float = 0.0
    bits_choices: tuple[int, ...] = field(default=DEFAULT_CHOICES)
    percdamp: float = 0.01
    blocksize: int = 128

    @property
    def needs_hessian(self) -> bool:
        return self.method == "gptq"

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "method": self.method,
                "bits_allocation": self.bits_allocation, "bits_mean": self.bits_mean, "bits_step": self.bits_step,
                "bits_choices": list(self.bits_choices), "percdamp": self.percdamp, "blocksize": self.blocksize}


def make_spec(quantize: str | int | None, *, group_size: int | None = 128, symmetric: bool = True,
              method: str = "gptq", bits_allocation: str = "uniform", bits_mean: float | None = None,
              bits_step: float = 0.0, bits_choices=DEFAULT_CHOICES) -> QuantSpec | None:
    """Check the quantization options and build the spec (None when ``quantize`` is None and nothing else asks for
    quantization).

    Args:
        quantize: ``"w4"``, ``"w8"``, ... or the bits as an int; None: no quantization.
        group_size: a positive int, or None / 0 / -1 for per-channel grids.
        bits_allocation: ``uniform`` or ``atp``; ``atp`` needs ``bits_mean`` within the choices' range and
            ``bits_step >= 0``.

    Raises:
        ConfigError: the first bad option, as one line.
    """
    others = (bits_allocation != "uniform" or bits_mean is not None or bits_step)
    if quantize is None:
        if others:
            raise ConfigError("--bits-allocation / --bits-mean / --bits-step need --quantize (e.g. --quantize w4)")
        return None
    bits = quantize if isinstance(quantize, int) and not isinstance(quantize, bool) else parse_quantize(quantize)
    if bits not in BITS:
        raise ConfigError(f"bits must be one of {{{', '.join(map(str, BITS))}}}, got {bits!r}")
    if group_size in (0, -1):
        group_size = None
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ConfigError(f"--group-size must be a positive integer (or 0 / -1 for per-channel), got {group_size!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown --quant-method {method!r}; choose one of: {', '.join(METHODS)}")
    if bits_allocation not in BITS_ALLOCATIONS:
        raise ConfigError(f"unknown --bits-allocation {bits_allocation!r}; choose one of: {', '.join(BITS_ALLOCATIONS)}")
    choices = tuple(sorted({int(b) for b in bits_choices}))
    bad = [b for b in choices if b not in BITS]
    if bad or not choices:
        raise ConfigError(f"--bits-choices must be widths from {{{', '.join(map(str, BITS))}}}, got "
                          f"{list(bits_choices)!r}")
    if bits_allocation == "uniform":
        if bits_mean is not None or bits_step:
            raise ConfigError("--bits-mean / --bits-step apply to --bits-allocation atp only")
    else:
        if bits_mean is None:
            bits_mean = float(bits)
        if not choices[0] <= bits_mean <= choices[-1]:
            raise ConfigError(f"--bits-mean {bits_mean:g} is outside the bit widths allowed ({choices[0]}..{choices[-1]})")
        if not bits_step >= 0:
            raise ConfigError(f"--bits-step must be >= 0 (bits per block, more bits on the input side), got {bits_step!r}")
    return QuantSpec(bits, group_size, bool(symmetric), method, bits_allocation,
                     None if bits_mean is None else float(bits_mean), float(bits_step), choices)


def check_group_widths(widths: dict[str, int], spec: QuantSpec) -> None:
    """Raise ConfigError if the group size does not divide the input width of a layer (name -> width)."""
    if spec.group_size is None:
        return
    for name, width in widths.items():
        if width % spec.group_size:
            raise ConfigError(f"--group-size {spec.group_size} does not divide the input width {width} of {name}; "
                              "choose a divisor (e.g. 32, 64) or 0 for per-channel grids")
