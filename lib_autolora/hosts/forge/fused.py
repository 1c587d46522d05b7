"""Both branches in one forward on the Forge family: an optimisation, and only that.

Without it the base branch is a second pass of the host's `calc_cond_uncond_batch` over the base
twins of the step's condition entries (sampling.py), which is always correct. With a strategy that
fuses branches (`batched`, `dual`), the base rows can instead ride along in the LoRA pass's forward
and be replayed when the host evaluates the base twins: one forward for both branches.

How: each LoRA entry carries its base twin's text conditioning in extra model_conds (TWIN_*) and
both share a tag (TAG, an EntryTag of plain ints); the model function wrapper runs [LoRA rows; base
rows] through the strategy and keeps the base rows by tag (`Step.stash`); the base branch's
predictions are then made from them as the host's calc makes them from a forward's rows, without a
second host pass (whose cond mark is a blocking copy to the device). Off where the rows cannot ride along:
ControlNet (its control is computed from the conditioning), conditions that are not tensors,
context windows (sampling.py), or too little free memory for the doubled batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

TWIN_CROSSATTN = "autolora_base_c_crossattn"
TWIN_Y = "autolora_base_y"
TAG = "autolora_entry"
OUR_KEYS = (TWIN_CROSSATTN, TWIN_Y, TAG)


class EntryTag:
    """A condition of the host's protocol (`process_cond`, `can_concat`, `concat`) holding plain
    ints, one per row: the host batches it with the entry's other conditions, and the wrapper reads
    which entry each row belongs to without reading a tensor (no device sync)."""

    def __init__(self, tags: tuple):
        self.tags = tags

    def process_cond(self, batch_size, device, **kwargs):
        return EntryTag(self.tags * batch_size if len(self.tags) == 1 else self.tags[:batch_size])

    def can_concat(self, other):
        return isinstance(other, EntryTag)

    def concat(self, others):
        return sum((o.tags for o in others), self.tags)

    def size(self):  # reForge sizes every condition for its memory estimate
        return [len(self.tags)]


def strip(c: dict) -> tuple[dict, dict]:
    """The model's conds without ours, and ours: nothing of AutoLoRA may reach the model."""
    c = dict(c)
    return c, {k: c.pop(k) for k in OUR_KEYS if k in c}


class Fusion:
    def __init__(self, api, note: Callable[[str], None]):
        self.api, self.note = api, note
        self.fits = {}  # input shape -> both branches fit in memory in one forward
        self.marks = {}  # doubled layout -> the host's cond_mark and indices for it

    def tag(self, lora_entries: list, base_entries: list, first: int) -> tuple[list, list]:
        """Each LoRA entry with its base twin's text conditioning, both with a shared tag."""
        lora_out, base_out = [], []
        for i, (lora, base) in enumerate(zip(lora_entries, base_entries)):
            tag = EntryTag((first + i,))
            lm, bm = dict(lora["model_conds"]), dict(base["model_conds"])
            lm[TWIN_CROSSATTN] = self.api.ConditionCrossAttn(bm["c_crossattn"].cond)
            if "y" in lm and "y" in bm:
                lm[TWIN_Y] = self.api.Condition(bm["y"].cond)
            lm[TAG] = bm[TAG] = tag
            lora_out.append({**lora, "model_conds": lm})
            base_out.append({**base, "model_conds": bm})
        return lora_out, base_out

    def forward(self, stash: dict, strategy, call: Callable, apply_model, args: dict, c: dict,
                ours: dict) -> Optional[torch.Tensor]:
        """The LoRA rows of one host forward that also ran the base rows (kept in `stash` by tag);
        None when they cannot ride along (the caller runs the LoRA rows alone)."""
        x, t, cou = args["input"], args["timestep"], args["cond_or_uncond"]
        if TWIN_CROSSATTN not in ours or not self._can_fuse(apply_model, x, c):
            return None
        to = c.pop("transformer_options", {})
        base_c = dict(c, c_crossattn=ours[TWIN_CROSSATTN])
        if TWIN_Y in ours:
            base_c["y"] = ours[TWIN_Y]
        both = list(cou) * 2
        # What the host keeps per batch chunk (cond_or_uncond; reForge's uuids) covers twice the chunks.
        to2 = {k: (list(v) * 2 if isinstance(v, list) and len(v) == len(cou) else v) for k, v in to.items()}
        to2["cond_or_uncond"] = both
        if self.api.compute_cond_mark is not None:  # hosts that mark rows (Forge, Neo, Classic; not reForge)
            to2["cond_mark"], to2["cond_indices"], to2["uncond_indices"] = self._marks(both, to.get("sigmas", t))

        def forward2(x_, t_, c_):
            return call(apply_model, x_, t_, dict(c_, transformer_options=to2), both)

        lora_out, base_out = strategy.evaluate(forward2, (x, t, c), (x, t, base_c))
        rows = x.shape[0] // max(len(cou), 1)
        tags = ours[TAG]
        for k in range(len(cou)):
            stash[tags[k * rows]] = base_out[k * rows:(k + 1) * rows]
        return lora_out

    @staticmethod
    def replay(stash: dict, x: torch.Tensor, ours: dict, cou) -> Optional[torch.Tensor]:
        """The base rows of a host forward of the base pass, when the LoRA pass computed them all."""
        if TAG not in ours:
            return None
        rows = x.shape[0] // max(len(cou), 1)
        tags = ours[TAG][::rows]
        if not all(tag in stash for tag in tags):
            return None
        return torch.cat([stash.pop(tag) for tag in tags])

    @staticmethod
    def predictions(stash: dict, cond: list, uncond: Optional[list], x: torch.Tensor) -> Optional[tuple]:
        """The base branch's (cond, uncond) predictions from the stash, as the host's
        `calc_cond_uncond_batch` makes them from a forward's rows: each entry's rows times its
        strength, summed, over the summed strengths (+1e-37); None where an entry has an area, a
        mask, a step range or a control of its own (the host's pass then runs), or was not stashed."""
        out = []
        for entries in (cond, uncond or []):
            total, count = torch.zeros_like(x), torch.ones_like(x) * 1e-37
            for entry in entries:
                tag = entry["model_conds"].get(TAG)
                if tag is None or tag.tags[0] not in stash or \
                        any(k in entry for k in ("area", "mask", "timestep_start", "timestep_end", "control")):
                    return None
                mult = torch.ones_like(x) * entry.get("strength", 1.0)
                total += stash[tag.tags[0]] * mult
                count += mult
            out.append(total / count)
        return out[0], out[1]

    def _marks(self, both: list, sigmas) -> tuple:
        """The host's cond_mark and cond/uncond indices for the doubled batch, made once per pass
        and layout: cond_mark is built on the CPU and copied to the device, a blocking copy."""
        key = (tuple(both), tuple(sigmas.shape), sigmas.dtype, sigmas.device)
        marks = self.marks.get(key)
        if marks is None:
            marks = self.marks[key] = (self.api.compute_cond_mark(both, sigmas),
                                       *self.api.compute_cond_indices(both, sigmas))
        return marks

    def _can_fuse(self, apply_model, x, c) -> bool:
        """Whether both branches can run in one forward; the memory part is asked once per pass
        and batch size (the host's memory query is slow, and its answer does not change per step)."""
        if "control" in c or "control_model" in c:
            self.note("AutoLoRA: ControlNet is active, so the base branch runs as a separate forward "
                      "(its control is computed from the base conditioning)")
            return False
        if any(k != "transformer_options" and not isinstance(v, torch.Tensor) for k, v in c.items()):
            return False
        model = getattr(apply_model, "__self__", None)
        if model is not None and hasattr(model, "memory_required") and x.device.type != "cpu":
            key = tuple(x.shape)
            fits = self.fits.get(key)
            if fits is None:
                fits = self.fits[key] = model.memory_required([x.shape[0] * 2, *x.shape[1:]]) <= \
                    self.api.free_memory(x.device)
            if not fits:
                self.note("AutoLoRA: not enough free memory to batch both branches; "
                          "the base branch runs as a separate forward")
                return False
        return True
