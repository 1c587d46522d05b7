"""The `auto` rule: the strategy picked per case of issue 8's table, and what memory changes."""
from lib_autolora.base_branch import choose_strategy

GIB = 2 ** 30
SD15_1 = 1 * 64 * 64  # latent pixels per branch
SDXL_1 = 1 * 128 * 128
SDXL_4 = 4 * 128 * 128


def pick(pixels, *, free=80 * GIB, swap=4 * GIB, **kw):
    return choose_strategy("auto", latent_pixels_per_branch=pixels, swap_bytes=swap, free_bytes=free, **kw)[0]


def test_launch_bound_cases_stack_both_weights_when_two_copies_fit():
    assert pick(SD15_1) == pick(SDXL_1) == "dual"
    assert pick(SDXL_1, free=7 * GIB) == "batched"  # one copy fits, two do not
    assert pick(SDXL_1, swap_budget_bytes=6 * GIB) == "batched"  # the user's cap counts too


def test_compute_bound_cases_swap_when_one_copy_fits():
    assert pick(SDXL_4) == "swap"
    assert pick(SDXL_4, free=3 * GIB) == "batched"


def test_unknown_free_memory_never_adds_weights():
    assert pick(SD15_1, free=None) == pick(SDXL_4, free=None) == "batched"
    assert pick(SD15_1, free=None, swap_budget_bytes=16 * GIB) == "dual"


def test_lean_memory_and_functional_loras():
    assert pick(SDXL_4, lean_memory=True) == pick(SD15_1, lean_memory=True) == "sequential"
    assert pick(SD15_1, weights_merged=False) == pick(SDXL_4, weights_merged=False) == "batched"
    for name in ("swap", "toggle", "dual"):
        assert choose_strategy(name, weights_merged=False)[0] == "batched"
    assert choose_strategy("dual")[0] == "dual"
