"""The split path's memory grows as O(L): a 32k-token guided attention fits where the dense mask cannot.

One VSF attention call (joint layout, batch 1, 1 head) at 32,768 tokens runs in a subprocess whose
address space is capped at what it already uses plus ``BUDGET`` (2 GiB). The dense path's additive
mask alone is ``L x (L + n)`` float32, about 4.3 GB at that size. Inside the cap:

* the split call succeeds, its peak resident memory grows by far less than an ``L x L`` matrix, and
  sampled image rows equal a float64 reference;
* the dense call, same inputs, same cap, fails to allocate.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.memcap import run_capped

BUDGET = 2 * 1024**3
N_IMG, N_POS, N_NEG, HEAD_DIM = 32_704, 56, 8, 16
ALPHA, BETA = 3.5, 0.1

SCRIPT = r"""
import json, math, resource, sys
import torch
from negguide.method import Segments
from negguide.plugins.vsf import ValueSignFlip, VSFConfig

n_img, n_pos, n_neg, dim, budget, alpha, beta = (float(a) if "." in a else int(a) for a in sys.argv[1:])
torch.set_num_threads(1)  # as the test session does: a loaded 2-core machine thrashes with more
gen = torch.Generator().manual_seed(0)
t = lambda n: torch.randn(1, 1, n, dim, generator=gen)
seg = Segments.one("joint", t(n_img), t(n_img), t(n_img), t(n_pos), t(n_pos), t(n_pos), t(n_neg), t(n_neg), t(n_neg))
warm = Segments.one("joint", t(64), t(64), t(64), t(n_pos), t(n_pos), t(n_pos), t(n_neg), t(n_neg), t(n_neg))
split = ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention="split"))
dense = ValueSignFlip(VSFConfig(scale=alpha, bias=beta, attention="dense"))
split.attend(warm), dense.attend(warm)  # thread pools and allocator arenas exist before the cap


cap_address_space(budget)
result = {}
rss0 = peak_rss()
out = split.attend(seg)
result["split_rss_growth"] = peak_rss() - rss0
result["split_shapes"] = [list(out.img.shape), list(out.pos.shape), list(out.neg.shape)]

# float64 reference for a few image queries: keys [I, P, N(1)], bias -beta on N(1), values flipped
rows = torch.tensor([0, 1, n_img // 2, n_img - 1])
q = seg.q_img[0, 0, rows].double()
k = torch.cat([seg.k_img, seg.k_pos, seg.k_neg], 2)[0, 0].double()
v = torch.cat([seg.v_img, seg.v_pos, -alpha * seg.v_neg], 2)[0, 0].double()
logits = q @ k.T / math.sqrt(dim)
logits[:, n_img + n_pos:] -= beta
ref = torch.softmax(logits, -1) @ v
result["split_max_err"] = (out.img[0, 0, rows].double() - ref).abs().max().item()
del out

# attention="dense" at the default mask budget: the call runs the split path instead, with a warning
import warnings
rss1 = peak_rss()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = dense.attend(seg)
result["dense_default_rss_growth"] = peak_rss() - rss1
result["dense_default_warning"] = " ".join(str(w.message) for w in caught)
result["dense_default_max_err"] = (out.img[0, 0, rows].double() - ref).abs().max().item()
del out

# the dense oracle itself, its mask budget lifted: it cannot allocate its L x L mask under the cap
import os
os.environ["NEGGUIDE_DENSE_LIMIT"] = str(2**50)
try:
    dense.attend(seg)
    result["dense"] = "ok"
except (RuntimeError, MemoryError) as exc:
    result["dense"] = str(exc).splitlines()[0][:300]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def capped_run() -> dict[str, object]:
    return run_capped(SCRIPT, N_IMG, N_POS, N_NEG, HEAD_DIM, BUDGET, ALPHA, BETA)


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)")


def test_dense_mask_exceeds_the_budget() -> None:
    """At this size the dense path's float32 mask alone is larger than the memory budget."""
    total = N_IMG + N_POS + N_NEG
    assert total >= 32_768
    mask_bytes = total * (total + N_NEG) * 4
    assert mask_bytes > 2 * BUDGET


def test_split_path_fits_and_is_exact(capped_run: dict[str, object]) -> None:
    """Under a cap of 2 GiB above baseline the split call succeeds, grows memory by O(L), and is exact."""
    assert capped_run["split_shapes"] == [
        [1, 1, N_IMG, HEAD_DIM],
        [1, 1, N_POS, HEAD_DIM],
        [1, 1, N_NEG, HEAD_DIM],
    ]
    # an L x L float32 matrix is ~4.3 GB; the split path's inputs and outputs are ~2 MB each
    assert capped_run["split_rss_growth"] < 256 * 1024**2
    assert capped_run["split_max_err"] < 1e-4


def test_dense_request_on_a_long_sequence_runs_the_split_path_with_a_warning(capped_run: dict[str, object]) -> None:
    """attention="dense" at 32k tokens would build a ~4 GB mask: the call runs the split path in O(L) memory
    instead (NEGGUIDE_DENSE_LIMIT, 1 GiB by default), says so, and is exact."""
    assert "would build a 4.0 GiB mask" in capped_run["dense_default_warning"]
    assert "running the split path instead" in capped_run["dense_default_warning"]
    assert capped_run["dense_default_rss_growth"] < 256 * 1024**2
    assert capped_run["dense_default_max_err"] < 1e-4


def test_dense_path_fails_under_the_same_cap(capped_run: dict[str, object]) -> None:
    """The dense path, same inputs, same cap, its mask budget lifted, cannot allocate its mask: the cap is what the
    split path avoids."""
    message = capped_run["dense"]
    assert message != "ok"
    asked = re.search(r"allocate (\d+) bytes", message)
    assert asked is not None, message
    assert int(asked.group(1)) >= N_IMG * N_IMG * 4  # an L x L float32 block
