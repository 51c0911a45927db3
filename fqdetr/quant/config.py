"""Quantization configuration: defaults for every layer plus per-layer overrides.

    QuantConfig(w_bits=4, a_bits=8, layers={"class_embed": {"w_bits": 8},
                                            "transformer.*.linear*": {"a_bits": None}})

Override keys are module names or fnmatch globs; the last matching entry wins for
each field it sets. ``skip`` lists names/globs left in float. JSON (and YAML, read
with the safe loader) round-trips through ``to_dict`` / ``from_dict``.
"""
import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fqdetr.io import write_json

CALIBRATION_METHODS = ("max", "percentile", "mse")


@dataclass
class LayerQuantConfig:
    """How one layer is quantized.

    w_bits: weight bits (symmetric, per output channel), 2..8.
    a_bits: input activation bits (per tensor), 2..8, or None for weight-only.
    a_signed: activation code range; None decides from the calibration data's sign.
    quantize_attention: for multi-head attention, also quantize Q K^T and A V operands.
    attn_bits: bits of those operands (attention probabilities unsigned).
    calibration: scale initialisation, "max" | "percentile" | "mse".
    lsq_grad_scale: multiply scale gradients by LSQ's 1/sqrt(n * qmax).
    """

    w_bits: int = 8
    a_bits: Optional[int] = 8
    a_signed: Optional[bool] = None
    quantize_attention: bool = False
    attn_bits: int = 8
    calibration: str = "max"
    percentile: float = 99.99
    lsq_grad_scale: bool = False

    def __post_init__(self):
        for name in ("w_bits", "attn_bits") + (("a_bits",) if self.a_bits is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                raise ValueError(f"{name}: expected an int in 2..8, got {value!r}")
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration: expected one of {CALIBRATION_METHODS}, got {self.calibration!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (0, 100], got {self.percentile}")


_LAYER_FIELDS = {f.name for f in dataclasses.fields(LayerQuantConfig)}


@dataclass
class QuantConfig(LayerQuantConfig):
    """Defaults for every layer (the LayerQuantConfig fields) plus overrides.

    layers: {name or glob: {field: value}} per-layer overrides.
    skip: names or globs of layers to leave in float.
    """

    layers: dict = field(default_factory=dict)
    skip: list = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.layers, dict):
            raise ValueError(f"layers: expected a mapping {{name or glob: {{field: value}}}}, "
                             f"got {type(self.layers).__name__}")
        if isinstance(self.skip, str) or not isinstance(self.skip, (list, tuple)) or \
                not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"skip: expected a list of layer names or globs, got {self.skip!r}")
        for pattern, override in self.layers.items():
            if not isinstance(override, dict):
                raise ValueError(f"layers[{pattern!r}]: expected a dict of fields, got {type(override).__name__}")
            unknown = set(override) - _LAYER_FIELDS
            if unknown:
                raise ValueError(f"layers[{pattern!r}]: unknown fields {sorted(unknown)}; "
                                 f"expected some of {sorted(_LAYER_FIELDS)}")
            self._merged({}, override)  # validates the values

    def _merged(self, base, override):
        values = {name: getattr(self, name) for name in _LAYER_FIELDS}
        values.update(base)
        values.update(override)
        return LayerQuantConfig(**values)

    def for_layer(self, name):
        """The LayerQuantConfig of module ``name``, or None when it is skipped."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return None
        merged = {}
        for pattern, override in self.layers.items():
            if fnmatch.fnmatchcase(name, pattern):
                merged.update(override)
        return self._merged({}, merged)

    def unmatched_patterns(self, names):
        """Override/skip patterns that match none of ``names`` (likely typos)."""
        patterns = list(self.layers) + list(self.skip)
        return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ValueError(f"quantization config: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"quantization config: unknown keys {sorted(unknown)}")
        return cls(**data)

    def save(self, path):
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path):
        """Reads a JSON or YAML (safe loader) config file."""
        path = Path(path)
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        try:
            text = path.read_text()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a valid {kind} quantization config (not UTF-8 text: {err})") from err
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
            raise ValueError(f"{path}: not a valid {kind} quantization config ({err})") from err
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err
