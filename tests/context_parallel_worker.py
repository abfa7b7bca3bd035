"""Guided pipelines under diffusers' context parallelism, one rank of ``torchrun``; run by
tests/test_context_parallel.py.

``torchrun --nproc_per_node 2 -m tests.context_parallel_worker OUT.json`` runs each case on two CPU processes
(gloo): the tiny pipeline guided in this process alone (the reference), then with its transformer under
``enable_parallelism`` (Ulysses or ring over the two ranks) and guided again; rank 0 writes, per case, the
largest difference between the two outputs, the guidance's own effect, and what ``remove()`` left.

diffusers 0.42.1 picks each rank's device as ``rank % torch.accelerator.device_count()``, which divides by zero
on a machine without an accelerator; the worker reports one accelerator there so that the CPU mesh can be made
(the collectives run on gloo, the tensors stay on the CPU).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

#: (family, degrees, method, negative): negatives of different token counts (tiny Flux: 32 prompt tokens, "snow" 5,
#: "snow ice" 8, "snow and ice" 11), so that the text stream's length is odd (negguide pads the negatives to a
#: multiple of the ranks when the text is sharded) or even
CASES = [
    ("flux", "ulysses", "vsf", "snow"),
    ("flux", "ulysses", "vsf", "snow ice"),
    ("flux", "ulysses", "nag", "snow"),
    ("flux", "ulysses", "nasa", "snow and ice"),
    ("flux", "ulysses", "cfg", "snow"),
    ("flux", "ring", "vsf", "snow"),
    ("flux", "ring", "nag", "snow and ice"),
    ("wan", "ulysses", "vsf", "snow"),
    ("wan", "ulysses", "nag", "snow and ice"),
    ("wan", "ulysses", "nasa", "snow"),
    ("wan", "ulysses", "cfg", "snow and ice"),
    ("flux", "ring", "nasa", "snow"),
]
PROMPT = "a red fox in a forest"


def _output(pipe, call):
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call)
    return out.frames if hasattr(out, "frames") else out.images


def run_case(family: str, degrees: str, method: str, negative: str) -> dict[str, object]:
    from diffusers import ContextParallelConfig

    import negguide
    from negguide import tiny

    call = {**tiny.CALL_KWARGS[family], "output_type": "latent"}
    if family == "flux" and method == "cfg":
        call["true_cfg_scale"] = 1.0  # the pipeline's own CFG off: negguide's runs the negative branch
    pipe = tiny.BUILDERS[family]()
    plain = _output(pipe, call)
    with negguide.apply(pipe, method, negative_prompt=negative):
        want = _output(pipe, call)
    transformer = pipe.transformer
    transformer.set_attention_backend("native")
    config = ContextParallelConfig(ulysses_degree=2) if degrees == "ulysses" else ContextParallelConfig(ring_degree=2)
    transformer.enable_parallelism(config=config)
    processors = dict(transformer.attn_processors)
    # ring: diffusers' own ring attention needs a backend returning the log-sum-exp, which the CPU's "native" one
    # does not; every forward of these tiny runs is guided, so no attention call reaches it
    sharded_plain = _output(pipe, call) if degrees == "ulysses" else None
    with negguide.apply(pipe, method, negative_prompt=negative):
        got = _output(pipe, call)
    restored = all(transformer.attn_processors[n] is p for n, p in processors.items())
    kept = all(getattr(p, "_parallel_config", None) is not None for p in processors.values()
               if hasattr(p, "_parallel_config"))  # fmt: skip
    after = None if sharded_plain is None else float((_output(pipe, call) - sharded_plain).abs().max())
    return {
        "case": [family, degrees, method, negative],
        "diff": float((got - want).abs().max()),
        "effect": float((want - plain).abs().max()),
        "restored": restored,
        "parallel_config_kept": kept,
        "unguided_after_remove": after,
    }


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if not torch.accelerator.is_available():
        torch.accelerator.device_count = lambda: 1  # see the module docstring
    results = [run_case(*case) for case in CASES]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
