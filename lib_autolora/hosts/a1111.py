"""AutoLoRA inside AUTOMATIC1111 v1.10 (modules.sd_samplers_cfg_denoiser.CFGDenoiser).

Where it binds to the host, and why there:

- **Factors**: after the host activated the prompt's LoRAs (the script's `process_batch`), read
  from the built-in Lora extension's own objects: `networks.loaded_networks`, each `Network` with
  te/unet multipliers and `dyn_dim`, its `NetworkModuleLora` modules (up/down/mid models, alpha,
  `calc_scale()`, `multiplier()`), keyed by the torch module they change (`sd_module`). Other
  types (LoHa, LoKr, full, IA3, OFT, GLoRA, DoRA) become exact dense deltas from the type's own
  `calc_updown`. The host's LoRA state is never changed.
- **Base conditioning**: the host's prompt_parser functions, called the way `p.setup_conds` calls
  them, on a model wrapper whose `get_learned_conditioning` runs with forward hooks that subtract
  the guided LoRAs from the text encoder(s) (MultiheadAttention layers, which the Lora extension
  always merges, get their base weights swapped in by reference for the call).
- **Per step**: `on_cfg_denoiser` (the callback A1111 runs inside `CFGDenoiser.forward`, after it
  built x_in/cond/uncond) wraps `denoiser.model_wrap` for this one step with a proxy that runs the
  strategy's LoRA and base branches for every model call the host makes (rows tracked by a cursor,
  so batch_cond_uncond=False chunks, padded conds and NGMS/skip-early-CFG layouts all follow), and
  sets `denoiser.combine_denoised` for this one step: the host's own combine on each branch (so
  AND prompts and weights work), then the AutoLoRA blend. Mask blending, live previews and
  after-CFG callbacks run unchanged on the blended result. `on_cfg_denoised` unwraps. Steps
  outside the guidance interval wrap nothing. Subclassing CFGDenoiser instead would need the
  samplers to be re-created, and other extensions patch the same class.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import params
from ..base_branch import StrategyUnavailable, choose_strategy, make_strategy
from ..factors import DenseTerm, LoraFactors, LowRankTerm
from ..guidance import GuidanceInterval, blend
from . import common

log = logging.getLogger("autolora")

RUN_ATTR = "_autolora_run"  # on `p`: the Run of the current generation


# -- factors from the Lora extension's loaded networks ---------------------------------------------

class SkipModule(Exception):
    """A LoRA module the base branch cannot remove; it stays in both branches."""


@dataclass
class MhaPart:
    """One guided LoRA module on a torch.nn.MultiheadAttention (OpenCLIP text encoders)."""

    module: object  # the Lora extension's NetworkModule
    part: str  # q, k, v or out


@dataclass
class A1111Factors:
    te: LoraFactors
    unet: LoraFactors
    mha: dict  # MultiheadAttention -> [MhaPart]
    exact_backup: set  # modules touched by guided LoRAs only: the host's backup is their base weight
    skipped: list  # (network name, module key, reason)
    guided: list  # guided Network objects
    signature: tuple  # identifies the loaded networks and their strengths

    @property
    def empty(self) -> bool:
        return not self.te.nonzero() and not self.unet.nonzero() and not self.mha


def network_signature(loaded) -> tuple:
    return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded)


def base_weight_of(module) -> torch.Tensor:
    """The module's weight without any LoRA: the Lora extension's backup once it merged, else the
    weight itself (the extension always backs up before it first changes a weight)."""
    backup = getattr(module, "network_weights_backup", None)
    if isinstance(backup, torch.Tensor):
        return backup.to(module.weight.device)
    return module.weight


def _is_text_encoder(net_module) -> bool:
    # The Lora extension's own rule (NetworkModule.multiplier): TE layer keys contain "transformer".
    return "transformer" in net_module.sd_key[:20]


def _mha_parent(net_module, layer_mapping) -> Optional[tuple]:
    """(MultiheadAttention, part) when the host applies this module through an MHA layer."""
    sd_module = net_module.sd_module
    if isinstance(sd_module, torch.nn.MultiheadAttention):
        for part in ("q", "k", "v", "out"):
            if net_module.network_key.split(".")[0].endswith(f"_{part}_proj") or \
                    net_module.sd_key.endswith(f"_{part}_proj"):
                return sd_module, part
        raise SkipModule("MultiheadAttention module without a q/k/v/out projection name")
    if net_module.sd_key.endswith("_out_proj") and layer_mapping is not None:
        parent = layer_mapping.get(net_module.sd_key[:-len("_out_proj")])
        if isinstance(parent, torch.nn.MultiheadAttention):
            return parent, "out"  # the host merges it via the MHA (out_proj.forward never runs)
    return None


def _dense_term(net_module, sd_module, source) -> DenseTerm:
    weight = sd_module.weight
    updown, ex_bias = net_module.calc_updown(base_weight_of(sd_module))
    if updown.numel() != weight.numel():
        if updown.ndim == 4 and weight.ndim == 4 and weight.shape[1] == 9 and updown.shape[1] == 4:
            updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))  # inpainting conv_in, as the host
        else:
            raise SkipModule(f"update of shape {tuple(updown.shape)} for a weight of {tuple(weight.shape)}")
    return DenseTerm(updown.reshape(weight.shape).detach(), None if ex_bias is None else ex_bias.detach(),
                     source=source)


def term_for(net_module, weights_merged: bool, source: str = ""):
    """LowRankTerm/DenseTerm equal to what the host adds to this module's output."""
    sd_module = net_module.sd_module
    if not isinstance(sd_module, (torch.nn.Linear, torch.nn.Conv2d)):
        raise SkipModule(f"LoRA on a {type(sd_module).__name__} layer")
    is_lora = hasattr(net_module, "up_model") and hasattr(net_module, "down_model")
    if not is_lora:
        # LoHa, LoKr, full, IA3, OFT, GLoRA: merged, the host adds calc_updown(W) to the weight;
        # functional, NetworkModule.forward adds ops(x, calc_updown(W)). A dense delta is exact for both.
        return _dense_term(net_module, sd_module, source)
    up, down = net_module.up_model.weight, net_module.down_model.weight
    mid = net_module.mid_model.weight if getattr(net_module, "mid_model", None) is not None else None
    scale = float(net_module.calc_scale()) * float(net_module.multiplier())
    if not weights_merged:
        # lora_functional: the host's NetworkModuleLora.forward adds up(down(x)) * multiplier * scale
        # (it applies no mid, dyn_dim, DoRA or bias there; mirror exactly what it adds).
        if mid is not None:
            raise SkipModule("LoCon Tucker (mid) weights, which A1111's lora_functional forward does not apply")
        if isinstance(sd_module, torch.nn.Conv2d) and (down.ndim != 4 or up.ndim != 4):
            raise SkipModule("conv LoRA with linear-shaped factors")
        return LowRankTerm(down=down, up=up, scale=scale, source=source)
    if getattr(net_module, "bias", None) is not None or getattr(net_module, "dora_scale", None) is not None:
        return _dense_term(net_module, sd_module, source)  # bias-carrying / DoRA: exact dense delta
    if isinstance(sd_module, torch.nn.Conv2d):
        in_channels = sd_module.weight.shape[1]
        if down.ndim != 4 or up.ndim != 4 or down.shape[1] != in_channels:  # e.g. inpainting conv_in
            return _dense_term(net_module, sd_module, source)
    dyn_dim = getattr(net_module.network, "dyn_dim", None)
    if mid is None and dyn_dim is not None:  # rebuild_conventional keeps the first dyn_dim ranks
        up, down = up[:, :int(dyn_dim)], down[:int(dyn_dim)]
    return LowRankTerm(down=down, up=up, scale=scale, mid=mid, source=source)


def read_factors(loaded, guided, weights_merged: bool, layer_mapping=None) -> A1111Factors:
    """Factors of the guided networks among `loaded` (the host's `networks.loaded_networks`)."""
    guided_ids = {id(n) for n in guided}
    te, unet, mha, skipped = LoraFactors(), LoraFactors(), {}, []
    touched_by_unguided, touched = set(), set()
    for net in loaded:
        for key, nm in net.modules.items():
            sd_module = nm.sd_module
            if id(net) not in guided_ids:
                touched_by_unguided.add(sd_module)
                continue
            source = getattr(getattr(net, "network_on_disk", None), "filename", net.name)
            try:
                parent = _mha_parent(nm, layer_mapping)
                if parent is not None:
                    mha.setdefault(parent[0], []).append(MhaPart(nm, parent[1]))
                    continue
                term = term_for(nm, weights_merged, source)
            except SkipModule as exc:
                skipped.append((net.name, key, str(exc)))
                continue
            (te if _is_text_encoder(nm) else unet).add(sd_module, nm.sd_key, term)
            touched.add(sd_module)
    for module, parts in list(mha.items()):
        if {p.part for p in parts} != {"q", "k", "v", "out"}:
            skipped.append((parts[0].module.network.name, module.network_layer_name if hasattr(
                module, "network_layer_name") else "MultiheadAttention",
                "MultiheadAttention LoRA without all of q/k/v/out, which the host does not apply either"))
            del mha[module]
    exact = {m for m in touched | set(mha) if m not in touched_by_unguided}
    return A1111Factors(te, unet, mha, exact, skipped, list(guided), network_signature(loaded))


def _mha_updowns(parts, mha):
    """(in_proj delta, out_proj delta) of the guided parts, as the host's MHA merge computes them."""
    by_part = {}
    for part in parts:
        by_part.setdefault(part.part, []).append(part.module)
    qw, kw, vw = mha.in_proj_weight.detach().chunk(3, 0)
    rows = []
    for name, w in (("q", qw), ("k", kw), ("v", vw)):
        rows.append(sum(m.calc_updown(w)[0].reshape(w.shape).float() for m in by_part[name]))
    out_w = mha.out_proj.weight.detach()
    out = sum(m.calc_updown(out_w)[0].reshape(out_w.shape).float() for m in by_part["out"])
    return torch.vstack(rows), out


class MhaSwap:
    """Weights of the MultiheadAttention layers with the guided LoRAs at coefficient `coef`
    (-1: removed), swapped in by reference for one text-encoder call and put back after.

    Nothing is cached: with only guided LoRAs on a layer its base weights are the Lora extension's
    own backup (no copy on the CPU); otherwise they are computed per call and freed after it."""

    def __init__(self, factors: A1111Factors, apply_weights=None):
        self.factors = factors
        self.apply_weights = apply_weights  # the Lora extension's network_apply_weights

    def weights(self, mha, coef: float):
        if self.apply_weights is not None:
            self.apply_weights(mha)  # the host's own merge, idempotent: weights and backup are current
        in_w, out_w = mha.in_proj_weight, mha.out_proj.weight
        backup = getattr(mha, "network_weights_backup", None)
        if coef == -1.0 and mha in self.factors.exact_backup and isinstance(backup, tuple) and \
                all(isinstance(b, torch.Tensor) for b in backup):
            new_in, new_out = (b.to(in_w.device, in_w.dtype) for b in backup)
        else:
            d_in, d_out = _mha_updowns(self.factors.mha[mha], mha)
            new_in = (in_w.detach().float() + coef * d_in.to(in_w.device)).to(in_w.dtype)
            new_out = (out_w.detach().float() + coef * d_out.to(out_w.device)).to(out_w.dtype)
        return (torch.nn.Parameter(new_in, requires_grad=False), torch.nn.Parameter(new_out, requires_grad=False))

    def swapped(self, coef: float):
        return _Swapped(self, coef)


class _Swapped:
    def __init__(self, swap: MhaSwap, coef: float):
        self.swap, self.coef, self.saved = swap, coef, []

    def __enter__(self):
        if self.coef == 0:
            return self
        try:
            for mha in self.swap.factors.mha:
                new_in, new_out = self.swap.weights(mha, self.coef)
                self.saved.append((mha, mha._parameters["in_proj_weight"], mha.out_proj._parameters["weight"]))
                mha._parameters["in_proj_weight"] = new_in
                mha.out_proj._parameters["weight"] = new_out
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for mha, in_w, out_w in reversed(self.saved):
            mha._parameters["in_proj_weight"] = in_w
            mha.out_proj._parameters["weight"] = out_w
        self.saved = []
        return False


class EncodeWith:
    """A stand-in for the model passed to prompt_parser: its get_learned_conditioning runs the real
    one with the guided LoRAs at `coef` in the text encoder(s) (-1 removes them)."""

    def __init__(self, model, hooks, mha_swap: MhaSwap, coef: float):
        self.model, self.hooks, self.mha_swap, self.coef = model, hooks, mha_swap, coef
        self.calls = 0

    def get_learned_conditioning(self, texts):
        self.calls += 1
        with self.mha_swap.swapped(self.coef), self.hooks.all_rows(self.coef):
            return self.model.get_learned_conditioning(texts)

    def __getattr__(self, name):
        return getattr(self.model, name)


# -- rows of conditioning ---------------------------------------------------------------------------

def subscript(cond, a, b):
    return {k: v[a:b] for k, v in cond.items()} if isinstance(cond, dict) else cond[a:b]


def catenate(parts):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def n_rows(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


class RowSource:
    """The rows of one branch's text conditioning in the host's x_in layout: the cond rows
    (one per AND sub-prompt) followed by the uncond rows."""

    def __init__(self, cond, uncond):
        self.parts = [(cond, n_rows(cond)), (uncond, n_rows(uncond))]
        self.n_cond, self.n_uncond = self.parts[0][1], self.parts[1][1]

    def take(self, start: int, k: int):
        pieces, pos = [], 0
        for part, n in self.parts:
            a, b = max(start, pos), min(start + k, pos + n)
            if a < b:
                pieces.append(subscript(part, a - pos, b - pos))
            pos += n
        if not pieces:
            raise LayoutError(f"rows {start}..{start + k} beyond the {pos} rows of conditioning")
        try:
            return catenate(pieces)
        except RuntimeError as exc:  # cond and uncond of different token lengths in one call
            raise LayoutError(f"cannot join cond and uncond rows {start}..{start + k}: {exc}") from None


class LayoutError(RuntimeError):
    """The host called the model with rows the AutoLoRA step cannot map to conditioning."""


def with_text(cond: dict, text_rows):
    """The host's model cond dict with its text conditioning replaced by `text_rows`."""
    new = dict(cond)
    if "c_crossattn" in cond:
        old = cond["c_crossattn"][0]
        if isinstance(text_rows, dict) or old.shape != text_rows.shape:
            raise LayoutError(f"text conditioning of shape {tuple(old.shape)} vs "
                              f"{tuple(text_rows.shape) if not isinstance(text_rows, dict) else 'dict'}")
        new["c_crossattn"] = [text_rows.to(old.device, old.dtype)]
        return new
    if not isinstance(text_rows, dict):
        raise LayoutError(f"the host's cond has keys {sorted(cond)}, no c_crossattn")
    for key, value in text_rows.items():
        if key not in cond:
            raise LayoutError(f"the host's cond lacks {key!r}")
        if cond[key].shape != value.shape:
            raise LayoutError(f"{key} of shape {tuple(cond[key].shape)} vs {tuple(value.shape)}")
        new[key] = value.to(cond[key].device, cond[key].dtype)
    return new


# -- one generation ---------------------------------------------------------------------------------

@dataclass
class CondPair:
    base: tuple  # (MulticondLearnedConditioning, uncond schedules) of the base branch
    lora: Optional[tuple] = None  # same for the LoRA branch at LoRA scale != 1 (None: the host's)


@dataclass
class Run:
    """Everything AutoLoRA holds for one generation (one `p`)."""

    settings: params.AutoLoraSettings
    record: dict
    interval: GuidanceInterval
    checkpoint: object = None  # checkpoint_key() of the model the factors were read from
    base_calls_done: int = 0  # base-branch calls of strategies already closed (hires pass with other LoRAs)
    factors: Optional[A1111Factors] = None
    strategy: object = None
    te_hooks: object = None
    mha_swap: Optional[MhaSwap] = None
    pairs: dict = field(default_factory=dict)  # id(host cond object) -> (host cond, CondPair)
    cond_cache: dict = field(default_factory=dict)
    wrapped: list = field(default_factory=list)  # denoisers with a step proxy in place
    notices: list = field(default_factory=list)
    off: Optional[str] = None  # set when guidance stopped mid-generation (refiner switch, layout)

    def note(self, text: str, p=None):
        common.note_once(self.notices, self.record, text, p)

    def close(self):
        for denoiser in list(self.wrapped):
            unwrap(denoiser)
        self.wrapped.clear()
        if self.strategy is not None:
            self.strategy.__exit__(None, None, None)
            self.base_calls_done += self.strategy.base_calls
            self.record["base_calls"] = self.base_calls_done
            self.strategy = None
        if self.te_hooks is not None:
            self.te_hooks.remove()
        self.pairs.clear()
        self.cond_cache.clear()


_LIVE_RUNS: list = []  # runs not finished yet (A1111 skips postprocess when a generation raises)


def _host():
    """The A1111 modules the adapter uses, imported lazily so this file imports without A1111."""
    from modules import devices, prompt_parser, sd_samplers, shared  # noqa: F401
    return shared, devices, prompt_parser, sd_samplers


def _networks():
    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "loaded_networks"):
        try:
            import networks as module  # extensions-builtin/Lora is on sys.path in A1111
        except ImportError:
            return None
    return module


class A1111Adapter:
    name = "a1111"

    def __init__(self, register_callbacks: bool = True):
        if register_callbacks:
            from modules import script_callbacks
            script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="autolora")
            script_callbacks.on_cfg_denoised(on_cfg_denoised, name="autolora")

    # -- the interface -------------------------------------------------------------------------
    def start_batch(self, p, settings):
        """Called per batch after the host activated the prompt's LoRAs."""
        previous = getattr(p, RUN_ATTR, None)
        if previous is not None:  # batch 2+ of the same generation: keep the run, refresh factors
            return self._refresh(p, previous, first_pass=True)
        for stale in list(_LIVE_RUNS):
            self._close(stale)
        shared = _host()[0]
        record = common.DIAGNOSTICS.begin(self.name, settings)
        model = shared.sd_model
        reason = unsupported_model(model)
        if reason:
            record["notices"].append(reason)
            return reason
        networks = _networks()
        if networks is None:
            message = "AutoLoRA: the built-in Lora extension is not loaded; AutoLoRA is off"
            record["notices"].append(message)
            return message
        if not networks.loaded_networks:
            message = "AutoLoRA: no LoRA in the prompt, nothing to guide; generated without AutoLoRA"
            record["notices"].append(message)
            return message
        run = Run(settings, record, GuidanceInterval(settings.start, settings.end), checkpoint=checkpoint_key(model))
        _LIVE_RUNS.append(run)
        setattr(p, RUN_ATTR, run)
        try:
            notice = self._refresh(p, run, first_pass=True)
        except BaseException:
            self._close(run, p)
            raise
        if getattr(p, RUN_ATTR, None) is run:
            record["active"] = True
            common.mark_active(p, settings)
        return notice

    def before_sampling(self, p, **kwargs):
        """process_before_every_sampling: the first pass, and the hires pass with its own conds."""
        run = getattr(p, RUN_ATTR, None)
        if run is None:
            return None
        c, uc = kwargs.get("c"), kwargs.get("uc")
        if c is None or uc is None:
            return None
        hires = bool(getattr(p, "is_hr_pass", False))
        if hires:
            notice = self._refresh(p, run, first_pass=False)
            if notice:
                p.comment(notice)
            if getattr(p, RUN_ATTR, None) is not run:
                return None
        run.pairs[id(c)] = (c, self._base_conds(p, run, hires))
        return None

    def finish(self, p):
        run = getattr(p, RUN_ATTR, None) if p is not None else None
        if run is not None:
            self._close(run, p)

    def register_xyz_axes(self):
        from modules import scripts
        xyz = common.find_xyz_module(scripts.scripts_data)
        if xyz is not None:
            common.add_xyz_axes(xyz)
        return xyz is not None

    def residue(self) -> dict:
        """What is registered now (GET /autolora/v1/residue): the host's callback lists, hooks on
        the loaded model's modules, runs not finished, CFG denoisers still wrapped."""
        from modules import script_callbacks
        shared = _host()[0]
        model = shared.sd_model
        roots = [model] if isinstance(model, torch.nn.Module) else []
        return common.residue_counts(script_callbacks.callback_map, roots, {
            "open_runs": len(_LIVE_RUNS), "wrapped_denoisers": sum(len(r.wrapped) for r in _LIVE_RUNS)})

    # -- internals ---------------------------------------------------------------------------------
    def _close(self, run: Run, p=None):
        try:
            run.close()
        finally:
            if run in _LIVE_RUNS:
                _LIVE_RUNS.remove(run)
            if p is not None and getattr(p, RUN_ATTR, None) is run:
                setattr(p, RUN_ATTR, None)
            run.record["peak_vram_bytes"] = _peak_bytes()
            common.DIAGNOSTICS.end(run.record)

    def _refresh(self, p, run: Run, first_pass: bool) -> Optional[str]:
        """(Re)read factors when the loaded networks or the checkpoint changed; (re)enter the strategy."""
        shared = _host()[0]
        networks = _networks()
        loaded = list(networks.loaded_networks)
        checkpoint = checkpoint_key(shared.sd_model)
        if run.factors is not None and run.factors.signature == network_signature(loaded) and \
                checkpoint == run.checkpoint:
            return None
        run.close()
        run.checkpoint = checkpoint
        if not loaded:
            run.factors = None
            message = "AutoLoRA: no LoRA in this pass's prompt; this pass runs without AutoLoRA"
            run.note(message)
            return message
        settings = run.settings
        entries = [(net, net.name, getattr(net, "mentioned_name", None),
                    getattr(getattr(net, "network_on_disk", None), "name", None),
                    getattr(getattr(net, "network_on_disk", None), "alias", None)) for net in loaded]
        guided_ids = {id(n) for n in common.select_guided(entries, settings.guided_loras)}
        guided = [n for n in loaded if id(n) in guided_ids]
        weights_merged = not bool(getattr(shared.opts, "lora_functional", False))
        factors = read_factors(loaded, guided, weights_merged, getattr(shared.sd_model, "network_layer_mapping", None))
        run.factors = factors
        notices = []
        for name, key, reason in _summarize_skipped(factors.skipped):
            notices.append(f"AutoLoRA: {name}: {key}: {reason}; kept in both branches")
        requested = settings.strategy
        if requested == "auto":
            requested = getattr(shared.opts, "autolora_default_strategy", "auto") or "auto"
        name, reason = choose_strategy(
            requested, weights_merged=weights_merged,
            latent_pixels_per_branch=int(p.batch_size) * (int(p.width) // 8) * (int(p.height) // 8),
            swap_bytes=sum(m.weight.numel() * m.weight.element_size() for m in factors.unet.nonzero()),
            free_bytes=_free_bytes(), swap_budget_bytes=_swap_budget())
        if requested != "auto" and name != requested:
            notices.append(f"AutoLoRA: {reason}")
        try:
            strategy = make_strategy(name, factors.unet, settings.lora_scale, weights_merged=weights_merged,
                                     base_weights=_base_weights_fn(factors, networks))
        except StrategyUnavailable as exc:
            notices.append(f"{exc}; using 'batched'")
            name = "batched"
            strategy = make_strategy(name, factors.unet, settings.lora_scale, weights_merged=weights_merged)
        run.strategy = common.enter_strategy(strategy, run.record)
        from ..base_branch import DeltaHooks
        run.te_hooks = DeltaHooks(factors.te)
        run.mha_swap = MhaSwap(factors, getattr(networks, "network_apply_weights", None))
        record = run.record
        record.update(strategy=name, strategy_reason=reason, weights_merged=weights_merged,
                      guided_loras=[n.name for n in guided],
                      modules={"text_encoder": len(factors.te.nonzero()) + len(factors.mha),
                               "unet": len(factors.unet.nonzero())})
        log.info("AutoLoRA: guiding %s with strategy %s (%s); %d UNet and %d text-encoder layers",
                 ", ".join(n.name for n in guided), name, reason, len(factors.unet.nonzero()),
                 len(factors.te.nonzero()) + len(factors.mha))
        for text in notices:
            run.note(text)
        return "\n".join(notices) or None

    def _base_conds(self, p, run: Run, hires: bool) -> CondPair:
        """Base (and LoRA-scale) conditioning of this pass's prompts, as p.setup_conds encodes them."""
        shared, devices, prompt_parser, sd_samplers = _host()
        if hires:
            prompts, negatives = p.hr_prompts, p.hr_negative_prompts
            width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
            config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
            steps = p.hr_second_pass_steps or p.steps
            base_steps, hires_steps = p.firstpass_steps, (config.total_steps(steps) if config else steps)
        else:
            prompts, negatives, width, height = p.prompts, p.negative_prompts, p.width, p.height
            config = sd_samplers.find_sampler_config(p.sampler_name)
            base_steps = config.total_steps(p.steps) if config else p.steps
            hires_steps = None
        settings = run.settings
        if not settings.base_text_encoder or run.factors is None:
            return CondPair(base=None)
        key = (tuple(prompts), tuple(negatives), width, height, base_steps, hires_steps,
               run.factors.signature, shared.opts.use_old_scheduling)
        if key in run.cond_cache:
            return run.cond_cache[key]
        model = shared.sd_model

        def encode(coef):
            wrapper = EncodeWith(model, run.te_hooks, run.mha_swap, coef)
            c_prompts = prompt_parser.SdConditioning(prompts, width=width, height=height)
            n_prompts = prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True)
            with devices.autocast():
                uc = prompt_parser.get_learned_conditioning(wrapper, n_prompts, base_steps, hires_steps,
                                                            shared.opts.use_old_scheduling)
                c = prompt_parser.get_multicond_learned_conditioning(wrapper, c_prompts, base_steps, hires_steps,
                                                                     shared.opts.use_old_scheduling)
            run.record["te_base_encodes"] += 1
            return c, uc

        pair = CondPair(base=encode(-1.0),
                        lora=encode(settings.lora_scale - 1.0) if settings.lora_scale != 1.0 else None)
        run.cond_cache[key] = pair
        return pair


def _summarize_skipped(skipped):
    by = {}
    for name, key, reason in skipped:
        by.setdefault((name, reason), []).append(key)
    for (name, reason), keys in by.items():
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        yield name, f"{len(keys)} layer(s) ({shown})", reason


def _base_weights_fn(factors: A1111Factors, networks):
    """Exact base weights for swap/dual/toggle in merged mode: the Lora extension's own backup when
    only guided LoRAs touch the layer, else the merged weight minus the guided delta."""
    from ..base_branch.strategies import base_weights_by_subtraction
    apply_weights = getattr(networks, "network_apply_weights", None)

    def base_weights(module, delta):
        if apply_weights is not None:
            apply_weights(module)  # the host's own merge, a no-op once this generation's LoRAs are in
        backup = getattr(module, "network_weights_backup", None)
        if module in factors.exact_backup and isinstance(backup, torch.Tensor):
            weight = backup.to(module.weight.device, module.weight.dtype)
            bias = None
            if delta.delta_bias() is not None:
                bias_backup = getattr(module, "network_bias_backup", None)
                if isinstance(bias_backup, torch.Tensor):
                    bias = bias_backup.to(module.bias.device, module.bias.dtype)
            return weight, bias
        return base_weights_by_subtraction(module, delta)

    return base_weights


def checkpoint_key(model):
    info = getattr(model, "sd_checkpoint_info", None)
    return (getattr(info, "filename", None), getattr(info, "title", None), id(model)) if info is not None else id(model)


def unsupported_model(model) -> Optional[str]:
    if getattr(model, "cond_stage_key", None) == "edit":
        return "AutoLoRA: instruct-pix2pix (edit) checkpoints are not supported; generated without AutoLoRA"
    if getattr(getattr(model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "AutoLoRA: unCLIP (crossattn-adm) checkpoints are not supported; generated without AutoLoRA"
    if getattr(model, "is_sd3", False):
        return "AutoLoRA: SD3 checkpoints are not supported on A1111; generated without AutoLoRA"
    return None


def _free_bytes():
    if torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info()[0])
        except RuntimeError:
            return None
    return None


def _swap_budget():
    shared = _host()[0]
    mb = getattr(shared.opts, "autolora_swap_budget_mb", 0) or 0
    return int(mb) * 2 ** 20 if mb > 0 else None


def _peak_bytes():
    if torch.cuda.is_available():
        try:
            return int(torch.cuda.max_memory_allocated())
        except RuntimeError:
            return None
    return None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# -- per step: the CFG denoiser callbacks -----------------------------------------------------------

class StepProxy(torch.nn.Module):
    """Stands in for `denoiser.model_wrap` during one guided step.

    Each call of the host covers consecutive rows of its x_in layout ([cond rows; uncond rows], the
    uncond rows absent on NGMS / skip-early-CFG steps). The proxy runs the strategy on the LoRA rows
    and on the same rows with the base branch's text conditioning, returns the LoRA output to the
    host and keeps the base output for `combine_denoised`.
    """

    def __init__(self, real, denoiser, strategy, base_rows: Optional[RowSource], lora_rows: Optional[RowSource],
                 n_rows: int):
        super().__init__()
        object.__setattr__(self, "real", real)
        object.__setattr__(self, "denoiser", denoiser)
        object.__setattr__(self, "strategy", strategy)
        self.base_rows, self.lora_rows, self.n_rows = base_rows, lora_rows, n_rows
        self.cursor = 0
        self.base_out = None
        self.error: Optional[str] = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "real"), name)

    def forward(self, x, sigma, cond=None, **kwargs):
        real = object.__getattribute__(self, "real")
        k, start = x.shape[0], self.cursor
        self.cursor += k
        if self.error is not None or start + k > self.n_rows:
            self.error = self.error or f"the host made an extra model call (rows {start}..{start + k})"
            return real(x, sigma, cond=cond, **kwargs)
        try:
            base_cond = cond if self.base_rows is None else with_text(cond, self.base_rows.take(start, k))
            lora_cond = cond if self.lora_rows is None else with_text(cond, self.lora_rows.take(start, k))
        except LayoutError as exc:
            self.error = str(exc)
            return real(x, sigma, cond=cond, **kwargs)

        def forward(x_, sigma_, cond_):
            return real(x_, sigma_, cond=cond_, **kwargs)

        lora_out, base_out = self.strategy.evaluate(forward, (x, sigma, lora_cond), (x, sigma, base_cond))
        if self.base_out is None:
            self.base_out = torch.zeros((self.n_rows, *base_out.shape[1:]), device=base_out.device,
                                        dtype=base_out.dtype)
        self.base_out[start:start + k] = base_out
        return lora_out


def unwrap(denoiser) -> None:
    proxy = denoiser._modules.get("model_wrap") if hasattr(denoiser, "_modules") else None
    if isinstance(proxy, StepProxy):
        denoiser.model_wrap = object.__getattribute__(proxy, "real")
    if "combine_denoised" in getattr(denoiser, "__dict__", {}):
        del denoiser.__dict__["combine_denoised"]


def _reconstruct(prompt_parser, pair, step):
    c, uc = pair
    return prompt_parser.reconstruct_multicond_batch(c, step)[1], prompt_parser.reconstruct_cond_batch(uc, step)


def _pad_like_host(denoiser, opts, cond, uncond):
    """The host pads cond/uncond to equal token lengths after the callback; do the same to ours."""
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    saved = denoiser.padded_cond_uncond, denoiser.padded_cond_uncond_v0
    try:
        if getattr(opts, "pad_cond_uncond_v0", False):
            return denoiser.pad_cond_uncond_v0(cond, uncond)
        if getattr(opts, "pad_cond_uncond", False):
            return denoiser.pad_cond_uncond(cond, uncond)
        return cond, uncond
    finally:
        denoiser.padded_cond_uncond, denoiser.padded_cond_uncond_v0 = saved


def on_cfg_denoiser(params_):
    """script_callbacks.on_cfg_denoiser: set up the step if it is guided; otherwise nothing."""
    denoiser = params_.denoiser
    run = getattr(getattr(denoiser, "p", None), RUN_ATTR, None)
    if run is None:
        return
    unwrap(denoiser)  # a step that raised may have left its proxy
    if run.strategy is None or run.off:
        return
    shared, _, prompt_parser, _ = _host()
    p = denoiser.p
    if checkpoint_key(shared.sd_model) != run.checkpoint:
        run.note("AutoLoRA: the checkpoint changed during sampling (refiner); the rest runs without AutoLoRA", p)
        run.off = "checkpoint changed"
        return
    extra = getattr(denoiser.sampler, "sampler_extra_args", None) or {}
    entry = run.pairs.get(id(extra.get("cond")))
    if entry is None or entry[0] is not extra.get("cond"):
        run.note("AutoLoRA: the sampler's conditioning is not the one prepared for this pass "
                 "(refiner switch or another extension); those steps run without AutoLoRA", p)
        return
    if not run.interval.contains_step(denoiser.step, denoiser.total_steps or 0):
        run.record["plain_steps"] += 1
        return
    pair = entry[1]
    text_cond, text_uncond = params_.text_cond, params_.text_uncond
    n_cond, n_uncond = n_rows(text_cond), n_rows(text_uncond)

    def source(conds):
        if conds is None:
            return None
        c, u = _reconstruct(prompt_parser, conds, denoiser.step)
        if (c.shape if not isinstance(c, dict) else c["crossattn"].shape) != \
                (text_cond.shape if not isinstance(text_cond, dict) else text_cond["crossattn"].shape):
            raise LayoutError("base conditioning does not match the host's (another extension changed it?)")
        c, u = _pad_like_host(denoiser, shared.opts, c, u)
        return RowSource(c, u)

    try:
        base_rows, lora_rows = source(pair.base), source(pair.lora)
    except LayoutError as exc:
        run.note(f"AutoLoRA: {exc}; this step runs without AutoLoRA", p)
        return
    real = denoiser.inner_model  # creates model_wrap if the host reset it
    proxy = StepProxy(real, denoiser, run.strategy, base_rows, lora_rows, n_cond + n_uncond)
    denoiser.model_wrap = proxy
    run.wrapped.append(denoiser)
    original = type(denoiser).combine_denoised.__get__(denoiser)
    settings = run.settings

    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        unwrap(denoiser)
        if denoiser in run.wrapped:
            run.wrapped.remove(denoiser)
        if proxy.error is not None or proxy.base_out is None:
            run.note(f"AutoLoRA: {proxy.error or 'no model call'}; a step ran without AutoLoRA", p)
            return original(x_out, conds_list, uncond, cond_scale)
        if proxy.cursor == n_cond + n_uncond:
            base_x_out, skipped = proxy.base_out, False
        elif proxy.cursor == n_cond:  # NGMS / skip early CFG: the host fakes the uncond rows
            seen = proxy.base_out[:n_cond]
            base_x_out = torch.cat([seen] + [seen[conds[0][0]:conds[0][0] + 1] for conds in conds_list])
            skipped = True
        else:
            run.note(f"AutoLoRA: the host evaluated {proxy.cursor} of {n_cond + n_uncond} rows; "
                     f"a step ran without AutoLoRA", p)
            return original(x_out, conds_list, uncond, cond_scale)
        w1 = cond_scale if skipped or settings.w1 is None else settings.w1
        w2 = cond_scale if skipped or settings.w2 is None else settings.w2
        lora = original(x_out, conds_list, uncond, w2)
        base = original(base_x_out.to(x_out.dtype), conds_list, uncond, w1)
        run.record["guided_steps"] += 1
        run.record["base_calls"] = run.base_calls_done + (run.strategy.base_calls if run.strategy is not None else 0)
        return blend(base, lora, settings.gamma)

    denoiser.combine_denoised = combine_denoised


def on_cfg_denoised(params_):
    """script_callbacks.on_cfg_denoised: the model calls of this step are done; unwrap the model."""
    proxy = getattr(params_, "inner_model", None)
    if isinstance(proxy, StepProxy):
        denoiser = object.__getattribute__(proxy, "denoiser")
        if denoiser._modules.get("model_wrap") is proxy:
            denoiser.model_wrap = object.__getattribute__(proxy, "real")
