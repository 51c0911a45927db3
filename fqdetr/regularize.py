"""Fisher-trace regularisation for QAT (docs/METHOD.md section 4).

    L_QAT = L_all(Q(W)) + lambda * R,   R = tr(F_crit) over the quantized weights

Estimators of R (docs/METHOD.md section 4.2, where the measurement that chose the default is):
    "per-sample" (default): R = 1/B sum_n || grad_W l_crit,n ||^2, the Fisher trace of the batch
                            (B backward passes with a graph, then one double backward)
    "batch":                R = || grad_W sum_n l_crit,n ||^2 (one pass; cross terms between
                            images included, so not a Fisher trace)
Gradient of R (a Hessian-vector product, dR/dW = 2 H g):
    "exact":             double backward (create_graph=True) through the quantizers,
                         which run as twice-differentiable compositions (fk.differentiable)
    "finite-difference": 2 (grad L(W + eps g/|g|) - grad L(W)) |g| / eps, with the fused kernels;
                         for quantized weights the step is added after quantization (codes
                         frozen), since Q(W + d) = Q(W) for small d and the difference would vanish.
                         It cannot see curvature carried through downstream activation
                         quantizers (their codes do not move either), so it approximates the
                         exact straight-through HVP; "exact" is the default.
The returned penalty's value is R and its gradient dR/dW: adding lambda * penalty to the
loss changes the update (a detached square would not; the tests check the gradient).
"""
import torch

import fqkernels as fk

ESTIMATORS = ("batch", "per-sample")
METHODS = ("exact", "finite-difference")


class FisherTraceRegularizer:
    """R = tr(F_crit) as a differentiable penalty.

    params: the weights R is taken over (e.g. the quantized layers' weights).
    estimator: "per-sample" (default) or "batch"; method: "exact" (default) or "finite-difference".
    quantizers: optional, for each param its weight Quantizer (or None): where the
        finite-difference step goes (see the module docstring).
    fd_eps: relative step of the finite-difference Hessian-vector product.
    """

    def __init__(self, params, estimator="per-sample", method="exact", fd_eps=1e-3, quantizers=None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        params = list(params)
        quantizers = list(quantizers) if quantizers is not None else [None] * len(params)
        if len(quantizers) != len(params):
            raise ValueError(f"quantizers: expected one entry per param ({len(params)}), got {len(quantizers)}")
        kept = [(p, q) for p, q in zip(params, quantizers) if p.requires_grad]
        if not kept:
            raise ValueError("params: expected at least one parameter that requires grad")
        self.params, self.quantizers = [p for p, _ in kept], [q for _, q in kept]
        self.estimator, self.method, self.fd_eps = estimator, method, fd_eps

    def __call__(self, loss_fn, image_loss=None, num_images=0):
        """loss_fn(reduction) -> scalar critical loss ("batch") or per-image losses [B]
        ("per_image"), recomputed by a fresh forward pass on each call.
        image_loss(n) -> image n's loss (scalar) from a forward pass of that image alone, for
        n < num_images: optional, used by "per-sample" with "exact", whose B backward passes
        then each run through one image's graph instead of the whole batch's (the same R for
        a model whose images do not interact; docs/METHOD.md section 4.2).

        Returns the penalty: value R, gradient dR/d(params).
        """
        if self.method == "exact":
            with fk.differentiable():
                if image_loss is not None and self.estimator == "per-sample":
                    return self._exact_of([image_loss(n) for n in range(num_images)])
                return self._exact_of(self._losses(loss_fn))
        return self._finite_difference(loss_fn)

    def _losses(self, loss_fn):
        if self.estimator == "batch":
            return [loss_fn("batch")]
        per_image = loss_fn("per_image")
        return [per_image[n] for n in range(per_image.shape[0])]

    def _exact_of(self, losses):
        """mean over ``losses`` (scalars) of ||d loss / d params||^2, differentiable (double backward)."""
        if not losses:
            raise ValueError("num_images: expected at least one image")
        total = 0.0
        for loss in losses:
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            total = total + sum(g.square().sum() for g in grads)
        return total / len(losses)

    def _grads(self, loss_fn):
        """Per-estimator-term gradient lists (no graph)."""
        losses = self._losses(loss_fn)
        return [torch.autograd.grad(loss, self.params, retain_graph=i < len(losses) - 1)
                for i, loss in enumerate(losses)]

    def _grad_of_term(self, loss_fn, n):
        """The gradient of estimator term n alone: one backward pass, not one per term."""
        return torch.autograd.grad(self._losses(loss_fn)[n], self.params)

    @torch.no_grad()
    def _shift(self, direction, step):
        """Moves the weights by step * direction (None: back to where they were)."""
        for p, q, d in zip(self.params, self.quantizers, direction):
            if q is not None:
                q.offset = None if step is None else d * step
            elif step is not None:
                p.add_(d, alpha=step)
            else:
                p.sub_(d, alpha=self._last_step)
        self._last_step = step

    def _finite_difference(self, loss_fn):
        with torch.enable_grad():
            base = self._grads(loss_fn)
        value = sum(sum(g.square().sum() for g in gs) for gs in base) / len(base)
        hvps = [torch.zeros_like(p) for p in self.params]
        for n, g in enumerate(base):
            norm = torch.sqrt(sum(x.square().sum() for x in g)).item()
            if norm == 0.0:
                continue
            step = self.fd_eps / norm
            self._shift(g, step)
            try:
                with torch.enable_grad():
                    shifted = self._grad_of_term(loss_fn, n)
            finally:
                self._shift(g, None)
            for h, g1, g0 in zip(hvps, shifted, g):
                h.add_((g1 - g0) * (2.0 / (step * len(base))))
        surrogate = sum((p * h).sum() for p, h in zip(self.params, hvps))
        return value.detach() + surrogate - surrogate.detach()
