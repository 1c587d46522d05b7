"""The `auto` rule picks, per case of the README's GPU table, the strategy measured best there."""
from lib_autolora.base_branch import choose_strategy

GIB = 2 ** 30
SD15_1 = 1 * 64 * 64  # latent pixels per branch
SDXL_1 = 1 * 128 * 128
SDXL_4 = 4 * 128 * 128


def pick(pixels, *, free=80 * GIB, swap=4 * GIB, **kw):
    return choose_strategy("auto", latent_pixels_per_branch=pixels, swap_bytes=swap, free_bytes=free, **kw)[0]


def test_one_image_runs_both_branches_in_one_forward():
    assert pick(SD15_1) == "dual"  # fastest at one SD1.5 image on the H200 and the H100
    assert pick(SDXL_1) == "batched"  # dual level or slower there, for +93 % memory
    assert pick(2 * SD15_1) == "batched"  # not measured: no extra weights on a guess


def test_dual_needs_room_for_both_weight_copies():
    assert pick(SD15_1, free=7 * GIB) == "batched"  # 8 GiB needed for two 4 GiB copies
    assert pick(SD15_1, swap_budget_bytes=7 * GIB) == "batched"
    assert pick(SD15_1, free=None) == "batched"
    assert pick(SD15_1, free=None, swap_budget_bytes=8 * GIB) == "dual"
    assert pick(SD15_1, weights_merged=False) == "batched"
    assert pick(SD15_1, swap=0) == "batched"  # nothing LoRA'd in the UNet: nothing to stack


def test_four_sdxl_images_swap_when_one_copy_fits():
    assert pick(SDXL_4) == "swap"
    assert pick(SDXL_4, free=3 * GIB) == "batched"
    assert pick(SDXL_4, swap_budget_bytes=2 * GIB) == "batched"  # the user's cap counts too
    assert pick(SDXL_4, free=None) == "batched"  # unknown free memory never adds weights
    assert pick(SDXL_4, free=None, swap_budget_bytes=16 * GIB) == "swap"


def test_lean_memory_and_functional_loras():
    assert pick(SDXL_4, lean_memory=True) == pick(SD15_1, lean_memory=True) == "sequential"
    assert pick(SDXL_4, weights_merged=False) == "batched"
    for name in ("swap", "dual"):
        assert choose_strategy(name, weights_merged=False)[0] == "batched"
    assert choose_strategy("dual")[0] == "dual"
