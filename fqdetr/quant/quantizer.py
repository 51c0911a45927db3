"""Quantizer: one operand's learned step size (LSQ) plus its calibration.

A Quantizer holds ``scale`` ([channels], a Parameter) and its bits/sign as
extra state, so a state dict restores the full quantization. Scales initialise
from data ("max", "percentile" or "mse"): weights from the weight itself,
activations from the first batch seen or from an explicit calibration pass.
"""
import torch
from torch import nn

import fqkernels as fk
from fqkernels import reference

_RESERVOIR = 1 << 20  # calibration values kept per activation quantizer


def _channel_rows(x, axis):
    """x as [channels, elements] (per channel along axis) or [1, numel]."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def scale_from_data(x, bits, signed, axis=None, method="max", percentile=99.99, grid=64):
    """Initial step size per channel ([C] float32) from data ``x``.

    max: s = max|x| / qmax.  percentile: the percentile of |x| instead of the max.
    mse: the clipping value minimising ||Q(x) - x||^2 over ``grid`` fractions of max|x|.
    Unsigned codes use max(x, 0) in place of |x|.
    """
    rows = _channel_rows(x.detach().float(), axis)
    mag = rows.abs() if signed else rows.clamp_min(0)
    qmax = reference.qrange(bits, signed)[1]
    amax = mag.amax(dim=1)
    if method == "percentile" and rows.shape[1] > 1:
        k = max(1, min(rows.shape[1], int(round(percentile / 100.0 * rows.shape[1]))))
        amax = mag.kthvalue(k, dim=1).values
    elif method == "mse":
        fractions = torch.linspace(1.0 / grid, 1.0, grid, device=x.device)
        best_err = torch.full_like(amax, float("inf"))
        best = amax.clone()
        for f in fractions:
            clip = (amax * f).clamp_min(1e-12)
            s = clip / qmax
            err = (reference.fake_quant_forward(rows, s, bits, signed, axis=0) - rows).square().sum(1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, clip, best)
        amax = best
    return amax.clamp_min(1e-8) / qmax


class Quantizer(nn.Module):
    """Fake quantizer of one operand.

    bits: 2..8. signed: code range, or None to decide from the first data seen.
    channels/axis: per-channel scales along ``axis`` (weights), or one scale (axis None).
    """

    def __init__(self, bits, signed=True, channels=1, axis=None, method="max", percentile=99.99,
                 lsq_grad_scale=False):
        super().__init__()
        fk.checks.check_bits(bits)
        self.bits, self.signed, self.axis = bits, signed, axis
        self.method, self.percentile, self.lsq_grad_scale = method, percentile, lsq_grad_scale
        self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # A Python copy of ``initialized``: compiled code guards on it instead of reading the
        # tensor (a data-dependent branch that torch.compile(fullgraph=True) and export refuse).
        self._ready = False
        self.enabled = True
        self._observed = None  # [values] while calibrating
        # Added after quantization when set: the finite-difference Hessian-vector product of
        # fqdetr.regularize perturbs the quantized weights with the codes frozen.
        self.offset = None

    @classmethod
    def for_weight(cls, config, weight):
        """Signed per-output-channel quantizer of ``weight`` [out, ...] under a LayerQuantConfig,
        its scale set from the weight."""
        quantizer = cls.from_config(config, config.w_bits, signed=True, channels=weight.shape[0], axis=0)
        quantizer.init_from(weight)
        return quantizer

    @classmethod
    def from_config(cls, config, bits, signed, channels=1, axis=None):
        """A quantizer with a LayerQuantConfig's calibration method, percentile and LSQ setting."""
        return cls(bits=bits, signed=signed, channels=channels, axis=axis, method=config.calibration,
                   percentile=config.percentile, lsq_grad_scale=config.lsq_grad_scale)

    def extra_repr(self):
        sign = {True: "signed", False: "unsigned", None: "sign from data"}[self.signed]
        where = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return f"bits={self.bits}, {sign}, {where}, method={self.method}"

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = bool(self.initialized)

    def get_extra_state(self):
        return {"bits": self.bits, "signed": self.signed}

    def set_extra_state(self, state):
        self.bits, self.signed = int(state["bits"]), state["signed"]

    @torch.no_grad()
    def init_from(self, x):
        """Sets the scale from data ``x`` with this quantizer's method."""
        if self.signed is None:
            self.signed = bool((x < 0).any())
        scale = scale_from_data(x, self.bits, self.signed, self.axis, self.method, self.percentile)
        self.scale.copy_(scale.to(self.scale.device))
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def set_bits(self, bits):
        """Changes the bit-width keeping the clipping range (scale * qmax) fixed."""
        fk.checks.check_bits(bits)
        if bits != self.bits and self.signed is not None:
            old_qmax = reference.qrange(self.bits, self.signed)[1]
            self.scale.mul_(old_qmax / reference.qrange(bits, self.signed)[1])
        self.bits = bits

    @property
    def observing(self):
        """True between start_observing() and finish_observing() / stop_observing()."""
        return self._observed is not None

    def start_observing(self):
        self._observed = []

    def stop_observing(self):
        """Drops what was observed since start_observing() and leaves the scale as it is."""
        self._observed = None

    @torch.no_grad()
    def finish_observing(self):
        """Sets the scale from everything observed since start_observing()."""
        if self._observed:
            self.init_from(torch.cat(self._observed))
        self._observed = None

    @torch.no_grad()
    def observe(self, x):
        flat = x.detach().float().reshape(-1)
        kept = sum(t.numel() for t in self._observed)
        room = _RESERVOIR - kept
        if flat.numel() > room > 0:
            # Keep a random subset, but always the extremes that "max" needs.
            idx = torch.randperm(flat.numel(), device=flat.device)[: max(room - 2, 0)]
            flat = torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])
        if room > 0:
            self._observed.append(flat)
        else:  # reservoir full: still track the extremes
            self._observed.append(torch.stack([flat.min(), flat.max()]))

    def grad_factor(self, x):
        if not self.lsq_grad_scale:
            return 1.0
        return fk.lsq_grad_factor(x.numel() // self.scale.numel(), self.bits, bool(self.signed))

    def prepare(self, x):
        """Observes or lazily initialises from ``x``; returns the scale to use.

        Initialisation reads the data (its sign, its range), so compile a model after its
        first call or calibration: from then on this is only a read of ``scale``.
        """
        if self._observed is not None:
            self.observe(x)
        if not self._ready:
            self.init_from(x)
        return self.scale

    def forward(self, x):
        if not self.enabled:
            return x
        scale = self.prepare(x)
        y = fk.fake_quant(x, scale, self.bits, self.signed, self.axis, self.grad_factor(x))
        return y if self.offset is None else y + self.offset
