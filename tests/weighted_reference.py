"""The PyTorch side of tests/multi/test_weighted_math.py, run in its own process (torch and MindSpore apart).

    python tests/weighted_reference.py OUT_DIR [MASKS.npz]

Builds a tiny three-layer torch model, adds the LoRA adapters of ``ADAPTERS`` with PEFT (random A
and B, seeded), runs PEFT's ``add_weighted_adapter`` for every case of ``CASES`` and writes:

- ``tensors.npz``: ``adapter/<name>/<cell>/A|B`` the inputs, ``case/<id>/<cell>/A|B`` PEFT's results;
- ``meta.json``: per adapter its r, lora_alpha, use_rslora, targets and PEFT's per-cell scaling; per
  case PEFT's new r, lora_alpha, use_rslora, per-cell scaling, or the error it raised.

The DARE cases (``seed`` in their arguments: pet_hooks' own, PEFT has none) need ``MASKS.npz``:
``<case>/<index>`` the masks pet_hooks drew for that case, in the order PEFT calls ``torch.bernoulli``
(per cell in module order: the A's, then the B's of the adapters there, or their deltas for the
``_svd`` forms). ``torch.bernoulli`` is replaced by a function handing them out in that order (it
checks each one's shape and that the probability asked is the case's density), so PEFT's own
``merge_utils`` and ``add_weighted_adapter`` run on pet_hooks' masks.

``ADAPTERS`` and ``CASES`` are plain data (torch is imported in ``main`` only), so the test imports
them too and replays each case with ``pet_hooks.multi.weighted.combine``.
"""
import json
import os
import sys

#: cell path -> (in, out) of the tiny model; head.0 narrows (out < in), fc1 widens (out > in)
CELLS = {"fc1": (12, 16), "fc2": (16, 10), "head.0": (10, 8)}

#: name -> LoraConfig fields; one and two share r=4 (for linear, ties, magnitude_prune), two and four use
#: rsLoRA, and no two target the same set of cells
ADAPTERS = {
    "one": dict(r=4, lora_alpha=8, use_rslora=False, target_modules=["fc1", "fc2"]),
    "two": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["fc2", "head.0"]),
    "three": dict(r=2, lora_alpha=5, use_rslora=False, target_modules=["fc1", "fc2", "head.0"]),
    "four": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["fc1", "head.0"]),
}

#: id -> add_weighted_adapter arguments (the new adapter is named after the id)
CASES = {
    "linear_12": dict(adapters=["one", "two"], weights=[0.7, -1.3], combination_type="linear"),
    "cat_123": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5, -0.8], combination_type="cat"),
    "cat_21": dict(adapters=["two", "one"], weights=[0.6, 1.1], combination_type="cat"),  # rsLoRA first
    "svd_123_r3": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5, -0.8], combination_type="svd",
                       svd_rank=3),
    "svd_31_default": dict(adapters=["three", "one"], weights=[1.2, -0.4], combination_type="svd"),
    "svd_42_r5": dict(adapters=["four", "two"], weights=[0.9, 0.7], combination_type="svd", svd_rank=5),
    # svd_rank at most the rank of every cell's sum (head.0 has three's only, r=2): beyond it the SVD's
    # null-space rows of Vh are arbitrary, and they take part in the clamp's quantile
    "svd_13_clamp": dict(adapters=["one", "three"], weights=[0.9, 0.7], combination_type="svd", svd_rank=2,
                         svd_clamp=0.8),
    "svd_1234_r9_reduced": dict(adapters=["one", "two", "three", "four"], weights=[0.5, -0.6, 0.7, 0.8],
                                combination_type="svd", svd_rank=9, svd_full_matrices=False),
    "single_3": dict(adapters=["three"], weights=[2.0], combination_type="svd"),  # PEFT falls back to linear
    "ties_12": dict(adapters=["one", "two"], weights=[0.8, 0.6], combination_type="ties", density=0.5),
    "ties_12_frequency": dict(adapters=["one", "two"], weights=[0.8, -0.6], combination_type="ties", density=0.7,
                              majority_sign_method="frequency"),
    "magnitude_prune_12": dict(adapters=["one", "two"], weights=[0.8, 0.6], combination_type="magnitude_prune",
                               density=0.6),
    "ties_svd_123": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5, -0.8], combination_type="ties_svd",
                         density=0.5, svd_rank=4),
    "magnitude_prune_svd_123": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5, -0.8],
                                    combination_type="magnitude_prune_svd", density=0.4),
    # DARE: PEFT run on the masks pet_hooks drew from `seed` (one and two target different cells, so on fc1
    # and head.0 a single adapter takes part)
    "dare_linear_12": dict(adapters=["one", "two"], weights=[0.8, -0.6], combination_type="dare_linear",
                           density=0.6, seed=11),
    "dare_ties_12": dict(adapters=["one", "two"], weights=[0.8, 0.6], combination_type="dare_ties", density=0.5,
                         seed=12),
    "dare_ties_12_frequency": dict(adapters=["one", "two"], weights=[0.8, -0.6], combination_type="dare_ties",
                                   density=0.7, majority_sign_method="frequency", seed=13),
    "dare_linear_svd_123": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5, -0.8],
                                combination_type="dare_linear_svd", density=0.5, svd_rank=4, seed=14),
    "dare_ties_svd_123": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5, -0.8],
                              combination_type="dare_ties_svd", density=0.6, svd_rank=3, seed=15),
    # where PEFT goes on although something is off
    "weights_short": dict(adapters=["one", "two", "three"], weights=[1.0, 0.5], combination_type="cat"),
    "svd_r9_full": dict(adapters=["one", "two", "three", "four"], weights=[0.5, -0.6, 0.7, 0.8],
                        combination_type="svd", svd_rank=9),  # head.0 (10 -> 8): A and B that do not multiply
    # where PEFT raises
    "err_linear_ranks": dict(adapters=["one", "three"], weights=[1.0, 1.0], combination_type="linear"),
    "err_type": dict(adapters=["one", "two"], weights=[1.0, 1.0], combination_type="average"),
    "err_unknown": dict(adapters=["one", "zzz"], weights=[1.0, 1.0], combination_type="cat"),
    "err_svd_r13_full": dict(adapters=["one", "four"], weights=[1.0, 1.0], combination_type="svd",
                             svd_rank=13),  # fc1 (12 -> 16): U[:, :13] @ diag(S[:13]) cannot multiply
}


def main(out_dir, masks_file=None):
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(*CELLS["fc1"])
            self.fc2 = torch.nn.Linear(*CELLS["fc2"])
            self.head = torch.nn.Sequential(torch.nn.Linear(*CELLS["head.0"]))

    torch.manual_seed(0)
    model = None
    for name, fields in ADAPTERS.items():
        config = LoraConfig(lora_dropout=0.0, init_lora_weights=False, **fields)
        if model is None:
            model = get_peft_model(Tiny(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)

    def lora_layers():
        for key, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                yield key, module

    arrays, meta = {}, {"adapters": {}, "cases": {}}
    with torch.no_grad():
        for name in ADAPTERS:  # A and B of every adapter drawn afresh, B non-zero
            for key, layer in lora_layers():
                if name in layer.lora_A:
                    layer.lora_A[name].weight.copy_(torch.randn_like(layer.lora_A[name].weight) * 0.5)
                    layer.lora_B[name].weight.copy_(torch.randn_like(layer.lora_B[name].weight) * 0.5)
                    arrays[f"adapter/{name}/{key}/A"] = layer.lora_A[name].weight.numpy().copy()
                    arrays[f"adapter/{name}/{key}/B"] = layer.lora_B[name].weight.numpy().copy()
            meta["adapters"][name] = dict(ADAPTERS[name], scaling={key: layer.scaling[name]
                                                                   for key, layer in lora_layers()
                                                                   if name in layer.lora_A})

    masks = {}
    if masks_file:
        with np.load(masks_file) as npz:
            for key in sorted(npz.files):  # "<case>/<index:03d>"
                case_id, _ = key.rsplit("/", 1)
                masks.setdefault(case_id, []).append(npz[key])
    real_bernoulli = torch.bernoulli
    queue = []

    def fed_bernoulli(probabilities, *args, **kwargs):  # PEFT's random_pruning calls it on full_like(t, density)
        assert not args and not kwargs and queue, "torch.bernoulli called more often than pet_hooks drew masks"
        mask, density = queue.pop(0)
        assert tuple(mask.shape) == tuple(probabilities.shape), (mask.shape, probabilities.shape)
        assert bool((probabilities == density).all()), "not the case's density"
        return torch.from_numpy(mask).to(probabilities.dtype)

    for case_id, kwargs in CASES.items():
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)  # pet_hooks' argument, not PEFT's
        if seed is not None:
            queue[:] = [(mask, kwargs["density"]) for mask in masks[case_id]]
            torch.bernoulli = fed_bernoulli
        try:
            model.add_weighted_adapter(adapter_name=case_id, **kwargs)
        except Exception as err:  # the test compares the type and the message
            meta["cases"][case_id] = {"error_type": type(err).__name__, "error": str(err)}
            model.peft_config.pop(case_id, None)
            continue
        finally:
            torch.bernoulli = real_bernoulli
        assert not queue, f"{case_id}: PEFT drew {len(queue)} masks fewer than pet_hooks"
        config = model.peft_config[case_id]
        scaling = {}
        for key, layer in lora_layers():
            if case_id in layer.lora_A:
                arrays[f"case/{case_id}/{key}/A"] = layer.lora_A[case_id].weight.detach().numpy().copy()
                arrays[f"case/{case_id}/{key}/B"] = layer.lora_B[case_id].weight.detach().numpy().copy()
                scaling[key] = layer.scaling[case_id]
        meta["cases"][case_id] = {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
                                  "scaling": scaling}

    np.savez(os.path.join(out_dir, "tensors.npz"), **arrays)
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
