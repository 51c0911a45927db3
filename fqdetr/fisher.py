"""FisherCollector: per-sample (per-image) empirical Fisher diagonals of every layer.

    with FisherCollector(model) as fc:
        for images, targets in loader:
            fc.backward(per_image_losses(model, images, targets))   # [N], one loss per image
    fc.traces()      # {layer: tr(F_l)} = sum over images of ||g_n||^2 / images
    fc.diagonals()   # {layer: diag(F_l) as a tensor shaped like the weight}

Quantized layers (fqdetr.quant) accumulate inside their fused backward; plain
nn.Linear / nn.Conv2d / nn.MultiheadAttention are handled with hooks that call
``fqkernels.per_sample_fisher`` on the saved input and the output gradient.

The loss must be a SUM of per-image losses: anything that mixes images (a batch
mean whose normaliser depends on the batch, BatchNorm in training mode) makes the
per-image gradients wrong. For DETR use SetCriterion(reduction="per_image") with a
fixed ``num_boxes``. ``backward`` refuses a scalar loss, and entering the collector
with BatchNorm layers in training mode raises.
"""
import contextlib
import fnmatch
import json

import torch
from torch import nn

import fqkernels as fk
from fqdetr.io import atomic_torch_save
from fqdetr.quant import QuantConv2d, QuantLinear, QuantMultiheadAttention
from fqdetr.quant.modules import samples_first

# Modules whose own backward accumulates into ``fisher_accumulator`` (from the pass that
# produces their weight gradient); other Linear / Conv2d / MultiheadAttention get hooks.
_FUSED = (QuantLinear, QuantConv2d, QuantMultiheadAttention)

_LAYERS = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def _weight_of(module):
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


@contextlib.contextmanager
def weights_requiring_grad(weights):
    """Every tensor of ``weights`` requires grad inside the block, and the flags are restored after:
    a layer's Fisher (or Hessian) needs its weight's gradient even where training freezes the layer
    (DETR's stem and layer1, which the allocation gives bits too)."""
    frozen = [w for w in weights if not w.requires_grad]
    for w in frozen:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for w in frozen:
            w.requires_grad_(False)


class FisherCollector:
    """Accumulates sum_n g_n^2 per layer weight over every backward inside the context.

    layers: names or globs of layers to collect (default: every Linear/Conv2d/MHA).
    batch_dims: {name or glob: dim} of the sample dimension of a layer's input for plain
        nn.Linear layers (default 0; DETR's transformer is sequence-first: dim 1).
        nn.MultiheadAttention uses its batch_first flag; Conv2d inputs are batch-first.
    """

    def __init__(self, model, layers=None, batch_dims=None, dtype=torch.float32):
        self.model, self.dtype = model, dtype
        self.batch_dims = dict(batch_dims or {})
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS)
                        and (layers is None or any(fnmatch.fnmatchcase(n, p) for p in layers))}
        if not self.modules:
            raise ValueError(f"layers: no Linear/Conv2d/MultiheadAttention module matches {layers}")
        plain_mha = [n for n, m in self.modules.items()
                     if isinstance(m, nn.MultiheadAttention) and not isinstance(m, QuantMultiheadAttention)]
        if plain_mha:
            raise ValueError(f"model: plain nn.MultiheadAttention {plain_mha[:3]} hides its projections inside a "
                             f"fused kernel; swap it first: quantize_model(model) and set_fake_quant(model, False) "
                             f"for float Fisher")
        # torch's attention reads out_proj.weight directly, so a QuantMultiheadAttention's out_proj is a
        # QuantLinear that is collected on its own; nothing to exclude.
        self.sums = {n: torch.zeros(_weight_of(m).shape, dtype=dtype, device=_weight_of(m).device)
                     for n, m in self.modules.items()}
        self.counts = dict.fromkeys(self.modules, 0)
        self._handles = []
        self._exit_stack = contextlib.ExitStack()

    def _batch_dim(self, name, module):
        parent = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        if isinstance(module, QuantMultiheadAttention) or (isinstance(parent, QuantMultiheadAttention)
                                                             and name.endswith(".out_proj")):
            return QuantMultiheadAttention.PROJECTION_SAMPLE_DIM
        if isinstance(module, nn.Conv2d):
            return 0
        for pattern, dim in self.batch_dims.items():
            if fnmatch.fnmatchcase(name, pattern):
                return dim
        return 0

    def __enter__(self):
        coupled = [n for n, m in self.model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if coupled:
            raise ValueError(f"model: BatchNorm layers in training mode couple the images of a batch, so per-image "
                             f"gradients are not separable: {coupled[:4]}; call model.eval() or freeze them")
        # The stack undoes whatever was set up, also when setting up fails half-way.
        with contextlib.ExitStack() as stack:
            stack.enter_context(weights_requiring_grad([_weight_of(m) for m in self.modules.values()]))
            stack.callback(self._detach)
            for name, module in self.modules.items():
                self._attach(name, module)
            self._exit_stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self._exit_stack.close()
        return False

    def _detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        for module in self.modules.values():
            if isinstance(module, _FUSED):
                module.fisher_accumulator = None

    def _attach(self, name, module):
        bd = self._batch_dim(name, module)
        if isinstance(module, _FUSED):
            # The module's backward adds into the buffer (fused, or by hooks while fake
            # quantization is off); here we only count the samples that reach it.
            module.fisher_accumulator = self.sums[name]
            module.fisher_batch_dim = bd
            n_of = (lambda args: args[0].shape[0 if module.batch_first else 1]) \
                if isinstance(module, QuantMultiheadAttention) else (lambda args: args[0].shape[bd])
            self._handles.append(module.register_forward_hook(
                lambda m, args, out: self._count_on_backward(name, out, n_of(args))))
            return
        self._handles.append(module.register_forward_hook(
            lambda m, args, out: self._on_forward(name, m, args, out, bd)))

    def _count_on_backward(self, name, out, n):
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.register_hook(lambda g: self.counts.__setitem__(name, self.counts[name] + n))

    def _on_forward(self, name, module, args, out, bd):
        if torch.is_grad_enabled() and out.requires_grad:
            x = args[0].detach()
            out.register_hook(lambda g: self._accumulate(name, module, x, g, bd))

    def _accumulate(self, name, module, x, grad_out, bd):
        if isinstance(module, nn.Conv2d):
            fk.conv2d_per_sample_fisher(x, grad_out, module.weight.shape, module.stride, module.padding,
                                        module.dilation, module.groups, dtype=self.dtype, out=self.sums[name])
        else:
            self.sums[name] += fk.per_sample_fisher(samples_first(x, bd), samples_first(grad_out, bd),
                                                    dtype=self.dtype)
        self.counts[name] += x.shape[bd]

    def backward(self, per_image_losses):
        """Backpropagates the sum of per-image losses [N] (refuses a scalar: it would hide a
        batch-coupled loss)."""
        if not isinstance(per_image_losses, torch.Tensor) or per_image_losses.dim() != 1:
            shape = list(per_image_losses.shape) if isinstance(per_image_losses, torch.Tensor) else None
            raise ValueError(f"per_image_losses: expected a 1-D tensor with one loss per image, got shape {shape}; "
                             f"a batch-averaged scalar loss couples the images (see FisherCollector's docs)")
        per_image_losses.sum().backward()

    @property
    def num_samples(self):
        return max(self.counts.values())

    def diagonals(self):
        """{layer: sum_n g_n^2 / N} (the empirical Fisher diagonal, shaped like the weight)."""
        return {n: s / max(self.counts[n], 1) for n, s in self.sums.items()}

    def traces(self):
        """{layer: tr(F_l)}."""
        return {n: float(d.sum()) for n, d in self.diagonals().items()}

    def merge(self, other):
        """Adds another collector's (or a loaded state's) sums and counts, e.g. from other processes."""
        missing, extra = sorted(set(self.sums) - set(other.sums)), sorted(set(other.sums) - set(self.sums))
        shapes = [f"{n}: {list(other.sums[n].shape)} vs {list(s.shape)}" for n, s in self.sums.items()
                  if n in other.sums and other.sums[n].shape != s.shape]
        if missing or extra or shapes:
            raise ValueError(f"merge: the other Fisher state is of another model (layers missing {missing[:8]}, "
                             f"unexpected {extra[:8]}, shape mismatches {shapes[:8]})")
        for n in self.sums:
            self.sums[n] += other.sums[n].to(self.sums[n].device, self.dtype)
            self.counts[n] += other.counts[n]
        return self

    def all_reduce(self):
        """Sums accumulators and counts over torch.distributed processes."""
        import torch.distributed as dist

        for n in self.sums:
            dist.all_reduce(self.sums[n])
            count = torch.tensor([self.counts[n]], dtype=torch.float64, device=self.sums[n].device)
            dist.all_reduce(count)
            self.counts[n] = int(count.item())

    def save(self, path):
        """Writes {sums, counts} atomically (torch.save; load with FisherCollector.load)."""
        atomic_torch_save({"sums": self.sums, "counts": self.counts, "traces_json": json.dumps(self.traces())},
                          path)

    @staticmethod
    def load(path):
        """A lightweight state with .sums/.counts/.traces() (mergeable into a collector)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not a readable Fisher state ({err})") from err
        if not (isinstance(state, dict) and isinstance(state.get("sums"), dict) and state["sums"]
                and isinstance(state.get("counts"), dict) and set(state["sums"]) == set(state["counts"])
                and all(isinstance(v, torch.Tensor) for v in state["sums"].values())):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path}: not a Fisher state (expected 'sums' and 'counts' per layer, "
                             f"as FisherCollector.save writes; found {keys})")
        return _LoadedFisher(state["sums"], state["counts"])


class _LoadedFisher(FisherCollector):
    def __init__(self, sums, counts):  # noqa: D107 - a saved state, not attached to a model
        self.sums, self.counts, self.dtype, self._handles = sums, counts, next(iter(sums.values())).dtype, []
