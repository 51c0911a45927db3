"""Calibration of activation scales over a few batches (weights calibrate from
themselves when a module is created or its bits change)."""
import logging

import torch
from tqdm import tqdm

from fqdetr.quant.quantizer import Quantizer

log = logging.getLogger(__name__)


def _activation_quantizers(model):
    return [m for m in model.modules() if isinstance(m, Quantizer) and m.axis is None]


@torch.no_grad()
def calibrate(model, batches, forward_fn=None, method=None, num_batches=None, progress=True):
    """Sets every activation scale from data seen over ``batches``.

    batches: iterable of inputs; forward_fn(model, batch) runs the model (default model(batch)).
    method: override every quantizer's method ("max" | "percentile" | "mse"); weight scales
    are recomputed with it too. num_batches: stop after that many batches.
    """
    forward_fn = forward_fn or (lambda m, b: m(b))
    quantizers = _activation_quantizers(model)
    if method is not None:
        for q in (m for m in model.modules() if isinstance(m, Quantizer)):
            q.method = method
    for q in quantizers:
        q.start_observing()
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, total=num_batches, desc="calibrate", disable=not progress, leave=False):
            forward_fn(model, batch)
            seen += 1
            if num_batches is not None and seen >= num_batches:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("batches: expected at least one calibration batch, got none")
    for q in quantizers:
        q.finish_observing()
    if method is not None:
        _recalibrate_weights(model)
    log.info("calibrated %d activation quantizer(s) on %d batch(es)", len(quantizers), seen)


def _recalibrate_weights(model):
    for module in model.modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None:
            weight = module.in_proj_weight if hasattr(module, "in_proj_weight") else module.weight
            wq.init_from(weight)
