"""k-diffusion's samplers without k-diffusion's package import.

`import k_diffusion` runs its __init__, which imports every submodule and with them torchvision,
clip, wandb and skimage; PyPI's torchvision cannot load beside the CPU torch we use. The samplers
live in `k_diffusion/sampling.py`, which needs scipy, torchdiffeq, torchsde, tqdm and, from
`k_diffusion.utils`, only `append_dims` (utils itself imports torchvision at the top).

So: k-diffusion is installed with `pip install --no-deps`, and this loader executes the installed
`sampling.py` (unmodified) as a submodule of a bare `k_diffusion` package object whose `utils` is
a module holding `append_dims` only. Inside the WebUIs the host's own k-diffusion is used instead.
"""
from __future__ import annotations

import importlib.util
import sys
import types

_PKG = "_autolora_k_diffusion"


def append_dims(x, target_dims):
    """Same contract as k_diffusion.utils.append_dims: trailing singleton dims up to target_dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load_sampling():
    """Returns the installed k-diffusion's `sampling` module (cached)."""
    name = f"{_PKG}.sampling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    pkg_dir = list(spec.submodule_search_locations)[0]
    package = types.ModuleType(_PKG)
    package.__path__ = [pkg_dir]
    utils = types.ModuleType(f"{_PKG}.utils")
    utils.append_dims = append_dims
    package.utils = utils
    sys.modules[_PKG] = package
    sys.modules[f"{_PKG}.utils"] = utils
    sampling_spec = importlib.util.spec_from_file_location(name, f"{pkg_dir}/sampling.py")
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules[name] = module
    sampling_spec.loader.exec_module(module)
    return module


SAMPLERS = {"euler": "sample_euler", "euler_a": "sample_euler_ancestral", "heun": "sample_heun",
            "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2s_a": "sample_dpmpp_2s_ancestral", "lms": "sample_lms"}
ANCESTRAL = frozenset({"euler_a", "dpmpp_2s_a"})  # they take a noise_sampler for their fresh noise


def sample(name: str, model, x, sigmas, **kwargs):
    sampling = load_sampling()
    return getattr(sampling, SAMPLERS[name])(model, x, sigmas, disable=True, **kwargs)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float):
    return load_sampling().get_sigmas_karras(steps, sigma_min, sigma_max)
