"""Model runner: batched log-likelihood and generation for any causal LM, with shared-prefix key/value reuse.

Tokenisation follows lm-evaluation-harness 0.4.13 exactly (the tokenizer's own special-token default, none
added when the text already starts with the BOS text; a (context, continuation) pair is encoded as the whole
string and split at the length of the encoded context; left truncation to the model's maximum length), so the
numbers are the ones lm-eval reports for the same model.

What differs is the work done. Every MMLU question of a subject starts with the same header and five shots,
every gsm8k_cot question with the same eight shots. The runner finds, per group of requests, the longest run of
token ids that is a prefix of *every* request (computed on the final token ids, so a BPE merge across the
boundary just shortens the shared part), runs the model over it once, and feeds each batch only the remaining
tokens on top of a copy of that cache.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

# Default maximum length when neither the config nor the tokenizer states one (lm-eval's fallback).
DEFAULT_MAX_LENGTH = 2048
# A tokenizer's "no limit" sentinel (int(1e30)).
TOKENIZER_INFINITY = 1000000000000000019884624838656
# Shorter shared prefixes are not worth a separate forward pass and a cache copy.
MIN_PREFIX_TOKENS = 16


def resolve_max_length(config, tokenizer) -> int:
    """Context length as lm-eval resolves it: text config, then top-level config, then the tokenizer, then 2048."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token-id prefix shared by all sequences."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _forward_parameters(model) -> dict:
    """Named parameters of the model's forward, looking through wrappers (PEFT) whose forward is (*args, **kwargs)."""
    params = inspect.signature(model.forward).parameters
    base = getattr(model, "get_base_model", None)
    if base is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        params = inspect.signature(base().forward).parameters
    return dict(params)


@dataclass
class _Scored:
    """One log-likelihood request after tokenisation: model input and the continuation it scores."""

    inp: tuple[int, ...]
    cont: tuple[int, ...]
    group: object
    truncated: bool


class ModelRunner:
    """Runs one causal LM for evaluation. Deterministic: greedy decoding, or seeded sampling per (prompt, sample)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        prefix_cache: bool = True,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or resolve_max_length(model.config, tokenizer)
        self.device = next(model.parameters()).device
        params = _forward_parameters(model)
        # transformers 5.x renamed the cache argument from past_key_values to cache; accept either.
        self._cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        if self._cache_arg is None:
            raise TypeError(f"{type(model).__name__}.forward takes no KV cache argument; the runner needs one")
        self.prefix_cache = prefix_cache
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self.progress = progress
        self.pad_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        )
        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        self.eos_ids = eos
        # lm-eval adds the decoded EOS token to every stop list.
        self.eos_text = (
            tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
            if tokenizer.eos_token_id is not None
            else None
        )

    # ------------------------------------------------------------------ tokenisation (lm-eval's rules)

    def encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's default special tokens, unless the text already starts with the BOS text."""
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(
        self, context: str, continuation: str, memo: dict[str, list[int]] | None = None
    ) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): trailing context spaces move to the continuation, whole string is encoded.

        `memo` caches context encodings across the requests of one call (the four MMLU choices share a context).
        """
        if not context:
            raise ValueError("an empty context is not supported; every task here builds a non-empty prompt")
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        if memo is None:
            ctx = self.encode(context)
        else:
            if context not in memo:
                memo[context] = self.encode(context)
            ctx = memo[context]
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ forward passes

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, use_cache: bool, **extra):
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache, **extra}
        if self._takes_position_ids:
            kwargs["position_ids"] = positions
        if cache is not None:
            kwargs[self._cache_arg] = cache
        return self.model(**kwargs)

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else getattr(out, "past_key_values", None)

    def _prefix(self, ids: Sequence[int]):
        """Keys and values of a shared prefix, computed once."""
        t = torch.tensor([list(ids)], device=self.device)
        extra = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        out = self._forward(t, torch.ones_like(t), torch.arange(len(ids), device=self.device)[None], None, True, **extra)
        return self._cache_of(out)

    @staticmethod
    def _batch_cache(cache, batch: int):
        """A private copy of the prefix cache for `batch` rows (the model extends the cache it is given)."""
        if cache is None:
            return None
        c = copy.deepcopy(cache)
        if batch > 1:
            c.batch_repeat_interleave(batch)
        return c

    def _shared_prefix(self, sequences: Sequence[Sequence[int]], limit: int) -> int:
        """Prefix length worth caching: common to all, at most `limit`, leaving every sequence at least one token."""
        if not self.prefix_cache or len(sequences) < 2:
            return 0
        n = min(common_prefix_length(sequences), limit, min(len(s) for s in sequences) - 1)
        return n if n >= MIN_PREFIX_TOKENS else 0

    # ------------------------------------------------------------------ log-likelihood

    @torch.inference_mode()
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], groups: Sequence[object] | None = None, desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether it is the greedy continuation) for each request.

        `groups` (one key per request) says which requests may share a prefix cache, e.g. the MMLU subject.
        """
        groups = list(groups) if groups is not None else [None] * len(requests)
        if len(groups) != len(requests):
            raise ValueError(f"{len(groups)} group keys for {len(requests)} requests")
        scored = []
        encoded: dict[str, list[int]] = {}
        for (context, continuation), group in zip(requests, groups):
            ctx, cont = self.encode_pair(context, continuation, encoded)
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's max length {self.max_length}")
            full = ctx + cont
            truncated = len(full) > self.max_length + 1
            inp = full[-(self.max_length + 1):][:-1]
            scored.append(_Scored(tuple(inp), tuple(cont), group, truncated))

        # One forward per distinct input: MMLU's four one-token answers share the same input. The continuation
        # is always the tail of the input, so only the last `need` positions of each input are scored.
        need: dict[tuple, int] = {}
        by_group: dict[object, list[tuple[int, ...]]] = {}
        for sc in scored:
            if sc.inp not in need:
                by_group.setdefault(sc.group if not sc.truncated else ("truncated", sc.inp), []).append(sc.inp)
            need[sc.inp] = max(need.get(sc.inp, 0), len(sc.cont))

        logprobs: dict[tuple, torch.Tensor] = {}
        bar = tqdm(total=len(need), desc=desc, disable=not self.progress, leave=False)
        for inputs in by_group.values():
            prefix_len = self._shared_prefix(inputs, min(len(i) - need[i] for i in inputs))
            cache = self._prefix(inputs[0][:prefix_len]) if prefix_len else None
            for batch in self._length_batches(inputs, prefix_len):
                rows = self._score_batch(batch, prefix_len, cache, max(need[i] for i in batch))
                for inp, row in zip(batch, rows):
                    logprobs[inp] = row
                bar.update(len(batch))
        bar.close()

        results = []
        for sc in scored:
            lp = logprobs[sc.inp][-len(sc.cont):]
            target = torch.tensor(sc.cont)
            total = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            results.append((total, greedy))
        return results

    def _length_batches(self, inputs: list[tuple[int, ...]], prefix_len: int) -> list[list[tuple[int, ...]]]:
        """Longest first, at most batch_size rows, and no row shorter than 3/4 of its batch's longest.

        Each padded position still attends to the whole prefix; with long prefixes (MMLU's history and law
        subjects) that attention dominates, so mixing short and long questions would waste most of a batch.
        """
        batches: list[list[tuple[int, ...]]] = []
        for inp in sorted(inputs, key=len, reverse=True):
            if (
                batches
                and len(batches[-1]) < self.batch_size
                and 4 * (len(inp) - prefix_len) >= 3 * (len(batches[-1][0]) - prefix_len)
            ):
                batches[-1].append(inp)
            else:
                batches.append([inp])
        return batches

    def _left_padded(self, suffixes: Sequence[Sequence[int]], prefix_len: int):
        """[prefix | left padding | suffix] rows: ids of the non-prefix part, the full mask, positions continuing
        the prefix. Every row ends in the last column, so the newest logits of all rows line up."""
        n, width = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for r, suffix in enumerate(suffixes):
            ids[r, width - len(suffix):] = torch.tensor(suffix)
            mask[r, prefix_len + width - len(suffix):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _score_batch(self, batch, prefix_len: int, cache, keep: int) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at the last `keep` positions of each input."""
        ids, mask, positions = self._left_padded([inp[prefix_len:] for inp in batch], prefix_len)
        batch_cache = self._batch_cache(cache, len(batch))
        extra = {"logits_to_keep": keep} if self._takes_logits_to_keep else {}
        out = self._forward(ids, mask, positions, batch_cache, batch_cache is not None, **extra)
        logp = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1).cpu()
        return list(logp)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        until: Sequence[str] = (),
        max_gen_toks: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seeds: Sequence[int] | None = None,
        desc: str = "generate",
    ) -> list[str]:
        """Continuation text of each prompt, cut at the first stop string (lm-eval's post-processing).

        Greedy when temperature is 0; otherwise sampled with a generator seeded by `seeds[i]` for prompt i, so the
        result does not depend on batching, process count or resumption.
        """
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        if max_gen_toks >= self.max_length:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for the prompt in the model's max length {self.max_length}"
            )
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
            raise ValueError("sampling needs one seed per prompt")
        stops = [s for s in list(until) + ([self.eos_text] if self.eos_text else []) if s]
        max_ctx = self.max_length - max_gen_toks
        encoded = [tuple(self.encode(p)[-max_ctx:]) for p in prompts]

        prefix_len = self._shared_prefix(encoded, min(len(e) for e in encoded) - 1 if encoded else 0)
        cache = self._prefix(encoded[0][:prefix_len]) if prefix_len else None
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
        outputs: list[str | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=desc, disable=not self.progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            gens = self._generate_batch(
                [encoded[i][prefix_len:] for i in idx],
                prefix_len,
                cache,
                stops,
                max_gen_toks,
                temperature,
                top_p,
                [seeds[i] for i in idx] if temperature > 0 else None,
            )
            for i, toks in zip(idx, gens):
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                for s in stops:
                    text = text.split(s)[0]
                outputs[i] = text
            bar.update(len(idx))
        bar.close()
        return outputs

    def _stopped(self, toks: list[int], stops: Sequence[str]) -> bool:
        if toks[-1] in self.eos_ids:
            return True
        if not stops:
            return False
        for skip in (True, False):
            text = self.tokenizer.decode(toks, skip_special_tokens=skip)
            if any(s in text for s in stops):
                return True
        return False

    def _next_tokens(self, logits: torch.Tensor, temperature: float, top_p: float, generators) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1:
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
        return torch.stack(
            [torch.multinomial(probs[r].cpu(), 1, generator=g)[0] for r, g in enumerate(generators)]
        ).to(logits.device)

    def _generate_batch(self, suffixes, prefix_len, cache, stops, max_gen_toks, temperature, top_p, seeds):
        """Decode a batch: [prefix | left padding | suffix] with the padding masked and positions continuing the prefix."""
        n = len(suffixes)
        ids, mask, positions = self._left_padded(suffixes, prefix_len)
        generators = None
        if seeds is not None:
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        extra = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        out = self._forward(ids, mask, positions, self._batch_cache(cache, n), True, **extra)
        batch_cache = self._cache_of(out)
        logits = out.logits[:, -1]
        active = list(range(n))
        generated: list[list[int]] = [[] for _ in range(n)]
        last_pos = positions[:, -1]
        for step in range(max_gen_toks):
            nxt = self._next_tokens(logits, temperature, top_p, generators)
            keep = []
            for j, r in enumerate(active):
                generated[r].append(int(nxt[j]))
                if not self._stopped(generated[r], stops):
                    keep.append(j)
            if not keep or step == max_gen_toks - 1:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=self.device)
                active = [active[j] for j in keep]
                nxt, mask, last_pos = nxt[sel], mask[sel], last_pos[sel]
                if generators is not None:
                    generators = [generators[j] for j in keep]
                batch_cache.batch_select_indices(sel)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = self._forward(nxt[:, None], mask, last_pos[:, None], batch_cache, True, **extra)
            batch_cache = self._cache_of(out)
            logits = out.logits[:, -1]
        return generated


def load_model(
    model: str,
    *,
    tokenizer: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a local path or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
    return m.to(device), tok


def sample_seed(base: int, *parts: int) -> int:
    """A reproducible per-sample seed from the run seed and the sample's coordinates (e.g. doc id, sample index)."""
    h = base
    for p in parts:
        h = (h * 1_000_003 + p + 1) % (2**63 - 1)
    return h
