"""The base branch's text conditioning on Forge.

Each prompt batch Forge encodes (`p.get_conds_with_caching`, first pass and hires pass alike) is
encoded once more by the same prompt function while hooks on the text-encoder layers subtract the
guided LoRAs' terms, read from the patches of `forge_objects.clip.patcher` (patcher.patch_sets).
`forge_objects_original.clip` would drop the unguided LoRAs too, and switching patchers re-merges
the weights (loads them twice); the hooks do neither and work the same for online LoRAs.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

from ...base_branch import DeltaHooks
from ...generation import Generation
from ...text_encoding import branch_encodings, encode_finite, not_finite_notice
from .factors import read_factors
from .patcher import guided_sources, originals, patch_sets

UNTOLD_TEXT_NOTICE = ("AutoLoRA: this WebUI does not record which LoRA a text-encoder patch comes from; the base "
                      "branch uses the LoRA'd text encoding (guide every LoRA of the prompt to remove it there too)")

log = logging.getLogger("autolora")


@contextmanager
def scaled_text_encoder(factors, coef: float):
    """coef x the guided LoRAs' terms on every row of the text encoder (b - 1 = base at base strength
    b, s - 1 = LoRA scale s). The text encoder may be called with any batch, so no row plan."""
    hooks = DeltaHooks(factors)
    try:
        with hooks.all_rows(coef):
            yield
    finally:
        for delta in factors.deltas.values():
            delta.release()


class BaseCondCache:
    """Base text conditionings kept across generations, tied to the very object Forge returned.

    Forge caches each prompt's conditioning (`get_conds_with_caching`, keyed by prompts, steps,
    checkpoint, LoRAs and their strengths, size, CLIP skip...) and hands back the same object
    while none of that changes; plain generation then encodes nothing. Our base conditioning is a
    function of that same input plus the AutoLoRA settings that shape it, so while Forge returns
    the same object and those settings are equal it is the same too, and re-encoding it (both
    prompts, every text encoder, with hooks) is work plain generation does not do.
    Entries hold Forge's object itself (compared with `is`, so a recycled id cannot match); a few
    are kept, like Forge's own caches (prompt, negative prompt, their hires versions)."""

    SIZE = 4

    def __init__(self):
        self.entries = []  # (forge_result, settings_key, value, te_modules, notices)

    @staticmethod
    def settings_key(gen: Generation) -> tuple:
        s = gen.settings
        return (gen.guided, float(s.lora_scale), bool(s.base_text_encoder), float(s.base_strength))

    def get(self, result, key):
        for entry in self.entries:
            if entry[0] is result and entry[1] == key:
                return entry
        return None

    def put(self, result, key, value, te_modules: int, notices: tuple) -> None:
        self.entries = [(result, key, value, te_modules, notices)] + [
            e for e in self.entries if not (e[0] is result and e[1] == key)][:self.SIZE - 1]


class BaseConditioning:
    """Wraps `p.get_conds_with_caching` for one generation: every prompt batch Forge encodes gets
    its base (and LoRA-scale) twin, found again by the identity of Forge's result."""

    def __init__(self, api, cache: BaseCondCache):
        self.api, self.cache = api, cache

    def wrap(self, p, gen: Generation, conds: dict) -> None:
        """From now on each of `p`'s encodings leaves its twins in `conds`, by the result's id."""
        original = p.get_conds_with_caching

        def get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
            result = original(function, required_prompts, steps, caches, extra_network_data, hires_steps)
            if result is not None and not gen.stopped:
                try:
                    conds[id(result)] = (result,) + self.cached(p, gen, result, function, required_prompts,
                                                                steps, hires_steps)
                except Exception as exc:  # the base conditioning must never break the generation
                    log.exception("AutoLoRA: base conditioning failed")
                    gen.note(f"AutoLoRA: base text encoding failed ({type(exc).__name__}: {exc}); "
                             f"the base branch uses the LoRA conditioning", getattr(p, "comment", None))
            return result

        p.get_conds_with_caching = get_conds_with_caching

    @staticmethod
    def unwrap(p) -> None:
        if p is not None and "get_conds_with_caching" in vars(p):
            del p.get_conds_with_caching

    def cached(self, p, gen: Generation, result, function, required_prompts, steps, hires_steps) -> tuple:
        """`encode`, or what it gave for this very Forge conditioning and these settings before."""
        key = BaseCondCache.settings_key(gen)
        hit = self.cache.get(result, key)
        if hit is not None:
            _, _, value, te_modules, notices = hit
            gen.stats.te_base_cached += 1
        else:
            value, te_modules, notices = self.encode(p, gen, function, required_prompts, steps, hires_steps)
            self.cache.put(result, key, value, te_modules, notices)
        gen.stats.modules["text_encoder"] = te_modules
        for text in notices:
            gen.note(text, getattr(p, "comment", None))
        return value

    def encode(self, p, gen: Generation, function, required_prompts, steps, hires_steps) -> tuple:
        """((base conditioning, LoRA-scale conditioning), LoRA'd text-encoder modules, notices)."""
        api = self.api
        patcher = p.sd_model.forge_objects.clip.patcher
        sets = patch_sets(patcher, gen.loaded)
        sources = guided_sources(sets, gen.guided, set(gen.loaded))
        if sources is None:
            return (None, None), 0, (UNTOLD_TEXT_NOTICE,)
        guided = read_factors(patcher.model, sets, sources, merge=api.merge_for(patcher), original=originals(patcher))
        te_modules, message = len(guided.factors.nonzero()), guided.message("text-encoder")
        notices = [f"AutoLoRA: {message}"] if message else []
        if guided.empty:
            return (None, None), te_modules, tuple(notices)  # the guided LoRAs leave the text encoder alone
        opts = api.options()

        def encode(coef):
            def once():
                with api.encoding(p), scaled_text_encoder(guided.factors, coef):
                    return api.encode_prompts(function, p.sd_model, required_prompts, steps, hires_steps)

            encoded = encode_finite(once, opts, required_prompts)
            gen.stats.te_base_encodes += 1
            if encoded is None:
                notices.append(not_finite_notice(bool(getattr(required_prompts, "is_negative_prompt", False))))
            return encoded

        return branch_encodings(gen.settings, encode), te_modules, tuple(notices)
