"""LoRA factors read from A1111's built-in Lora extension, and the text encoders' attention
layers whose base weights are swapped in for the base branch's text encoding.

After the host activated the prompt's LoRAs (the script's `process_batch`), the factors come from
the extension's own objects: `networks.loaded_networks`, each `Network` with te/unet multipliers
and `dyn_dim`, its `NetworkModuleLora` modules (up/down/mid models, alpha, `calc_scale()`,
`multiplier()`), keyed by the torch module they change (`sd_module`). Other types (LoHa, LoKr,
full, IA3, OFT, GLoRA, DoRA) become exact dense deltas from the type's own `calc_updown`. The
host's LoRA state is never changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...base_branch.strategies import base_weights_by_subtraction
from ...factors import BASE_COEF, DenseTerm, LoraFactors, LowRankTerm


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


QKV_PARTS = ("q", "k", "v")


def _fused_qkv_part(net_module) -> Optional[str]:
    """q, k or v when the host applies this module to a third of a fused qkv Linear (SD3's MMDiT
    `QkvLinear`: its Lora extension maps `..._qkv_{q,k,v}_proj` keys to the fused layer)."""
    sd_module = net_module.sd_module
    if not isinstance(sd_module, torch.nn.Linear) or not hasattr(net_module, "up_model"):
        return None
    for part in QKV_PARTS:
        if net_module.sd_key.endswith(f"_{part}_proj") and \
                sd_module.weight.shape[0] == 3 * net_module.up_model.weight.shape[0]:
            return part
    return None


def _qkv_terms(parts: dict, sd_module, weights_merged: bool, source: str) -> list:
    """The three parts of a fused qkv LoRA as terms on the fused weight, each in its third of the
    rows: what the host's merge adds (`vstack` of the three `calc_updown`s)."""
    if not weights_merged:
        raise SkipModule("a LoRA on split q/k/v of a fused layer, which lora_functional does not apply")
    rows = sd_module.weight.shape[0] // 3
    terms = []
    for i, part in enumerate(QKV_PARTS):
        nm = parts[part]
        up, down = nm.up_model.weight, nm.down_model.weight
        if getattr(nm, "mid_model", None) is not None or getattr(nm, "bias", None) is not None or \
                getattr(nm, "dora_scale", None) is not None or getattr(nm.network, "dyn_dim", None) is not None:
            third = sd_module.weight[i * rows:(i + 1) * rows]
            dense = torch.zeros_like(sd_module.weight, dtype=torch.float32)
            dense[i * rows:(i + 1) * rows] = nm.calc_updown(third)[0].reshape(third.shape).float()
            terms.append(DenseTerm(dense.detach(), source=source))
            continue
        term = LowRankTerm(down=down, up=up, scale=float(nm.calc_scale()) * float(nm.multiplier()), source=source)
        terms.append(term.embedded(sd_module.weight.shape, 0, i * rows))
    return terms


def _read_network(net, weights_merged: bool, layer_mapping, te, unet, mha, skipped) -> set:
    """Add one guided network's terms; returns the host modules it touched."""
    touched, qkv = set(), {}  # fused qkv Linear -> {part: module} of this network
    source = getattr(getattr(net, "network_on_disk", None), "filename", net.name)
    for key, nm in net.modules.items():
        part = _fused_qkv_part(nm)
        if part is not None:
            qkv.setdefault(nm.sd_module, {})[part] = nm
            continue
        try:
            parent = _mha_parent(nm, layer_mapping)
            if parent is not None:
                mha.setdefault(parent[0], []).append(MhaPart(nm, parent[1]))
                continue
            term = term_for(nm, weights_merged, source)
        except SkipModule as exc:
            skipped.append((net.name, key, str(exc)))
            continue
        (te if _is_text_encoder(nm) else unet).add(nm.sd_module, nm.sd_key, term)
        touched.add(nm.sd_module)
    for sd_module, parts in qkv.items():
        first = next(iter(parts.values()))
        name = first.sd_key.rsplit("_", 2)[0]
        try:
            if set(parts) != set(QKV_PARTS):
                raise SkipModule("a LoRA on only some of q/k/v of a fused layer, which the host does not apply either")
            terms = _qkv_terms(parts, sd_module, weights_merged, source)
        except SkipModule as exc:
            skipped.append((net.name, name, str(exc)))
            continue
        for term in terms:
            (te if _is_text_encoder(first) else unet).add(sd_module, name, term)
        touched.add(sd_module)
    return touched


def read_factors(loaded, guided, weights_merged: bool, layer_mapping=None) -> A1111Factors:
    """Factors of the guided networks among `loaded` (the host's `networks.loaded_networks`)."""
    guided_ids = {id(n) for n in guided}
    te, unet, mha, skipped = LoraFactors(), LoraFactors(), {}, []
    touched_by_unguided, touched = set(), set()
    for net in loaded:
        if id(net) in guided_ids:
            touched |= _read_network(net, weights_merged, layer_mapping, te, unet, mha, skipped)
        else:
            touched_by_unguided |= {nm.sd_module for nm in net.modules.values()}
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
    (BASE_COEF: removed), swapped in by reference for one text-encoder call and put back after.

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
        if coef == BASE_COEF and mha in self.factors.exact_backup and isinstance(backup, tuple) and \
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



def summarize_skipped(skipped):
    by = {}
    for name, key, reason in skipped:
        by.setdefault((name, reason), []).append(key)
    for (name, reason), keys in by.items():
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        yield name, f"{len(keys)} layer(s) ({shown})", reason


def base_weights_fn(factors: A1111Factors, networks):
    """Exact base weights for swap/dual in merged mode: the Lora extension's own backup when
    only guided LoRAs touch the layer, else the merged weight minus the guided delta."""
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
