"""``fqdetr allocate``: mixed-precision bit allocation by integer linear programming."""
from fqdetr.cli._common import add_common, bit_width, bit_widths, positive_float, read_json_option


def add_parser(subparsers):
    p = subparsers.add_parser(
        "allocate", help="choose weight bits per layer under a size budget (ILP, scipy milp)",
        description="Minimises sum_l tr(F_l)/n_l * ||Q_b(W_l) - W_l||^2 over one bit-width per layer under a "
                    "size budget (docs/METHOD.md section 3). Strategies: fisher (traces from 'fqdetr fisher'), "
                    "hessian (its Hutchinson traces), uniform, random. First conv and heads stay 8 bit. Writes "
                    "OUT/allocation.json {layer: {w_bits, a_bits}}.")
    add_common(p, data=False)
    p.add_argument("--fisher", metavar="JSON", help="fisher.json from 'fqdetr fisher' (fisher/hessian strategies)")
    p.add_argument("--objective", default="critical", help="which traces of --fisher to use (default critical)")
    p.add_argument("--strategy", default="fisher", choices=["fisher", "hessian", "uniform", "random"])
    p.add_argument("--budget", type=positive_float, default=4.0, help="average weight bits (default 4)")
    p.add_argument("--candidates", type=bit_widths, default=(2, 3, 4, 5, 6, 8),
                   help="comma-separated candidate bit-widths in 2..8 (default 2,3,4,5,6,8)")
    p.add_argument("--a-bits", type=bit_width, default=8, help="activation bits written with each layer (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    p.set_defaults(func=run)


def run(args):
    from fqdetr.engine.quantize import fixed_bounds, layer_weights, quantize_detr
    from fqdetr.io import write_json
    from fqdetr.models import load_detr_checkpoint

    qmodel = quantize_detr(load_detr_checkpoint(args.model))
    weights, bounds = layer_weights(qmodel), fixed_bounds(qmodel)
    sizes = {n: w.numel() for n, w in weights.items()}
    alloc = _allocate(args, weights, sizes, bounds, {"avg_bits": args.budget}, args.candidates)
    out = {n: {"w_bits": b, "a_bits": args.a_bits} for n, b in alloc.items()}
    print(f"wrote {write_json(out, f'{args.out}/allocation.json')}")
    return 0


def _allocate(args, weights, sizes, bounds, budget, candidates):
    from fqdetr.allocate import allocate_bits, random_sensitivity, sensitivities, uniform_allocation

    if args.strategy == "uniform":
        return uniform_allocation(sizes, budget, candidates, bounds)
    if args.strategy == "random":
        sens = random_sensitivity(sizes, candidates, args.seed)
    else:
        if not args.fisher:
            raise ValueError(f"--fisher: needed by the {args.strategy} strategy")
        key = "hessian" if args.strategy == "hessian" else args.objective
        traces = read_json_option(args.fisher, "--fisher").get(key)
        if traces is None:
            raise ValueError(f"--fisher: {args.fisher} has no '{key}' traces")
        try:
            sens = sensitivities(weights, traces, candidates)
        except ValueError as err:
            raise ValueError(f"--fisher: {args.fisher}: {err}") from err
    return allocate_bits(sens, sizes, budget, candidates, bounds=bounds)
