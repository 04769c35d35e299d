"""The engine: owns the layer loop of prefill and decode, and asks the method's policy at every layer."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from .cache import LayerKV
from .generation import Generation, Sampling, Stats, TextStream
from .methods import Method, Policy, Rows, Run, resolve_method
from .model import DecoderModel


class Engine:
    """Generation with one model, one tokenizer and a default method (overridable per call)."""

    def __init__(self, model: DecoderModel, tokenizer, method: str | Method = "dense"):
        self.model = model
        self.tokenizer = tokenizer
        self.method = resolve_method(method)
        self.last_generation: Generation | None = None  # set when a generate/stream call finishes

    # -- public API ------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        method: str | Method | None = None,
    ) -> Generation:
        """Generate up to `max_new_tokens` after `prompt` (text or token ids); greedy by default."""
        pieces = self._pieces(prompt, max_new_tokens, Sampling(temperature, top_p, seed), stop, chat, method)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        method: str | Method | None = None,
    ) -> Iterator[str]:
        """Like `generate`, but yields the text piece by piece as tokens are decoded.

        When the iterator is exhausted, `engine.last_generation` holds the full `Generation` (with stats).
        """
        yield from self._pieces(prompt, max_new_tokens, Sampling(temperature, top_p, seed), stop, chat, method)

    def next_token_logits(
        self, prompt: str | Sequence[int], continuation: Sequence[int], *, method: str | Method | None = None
    ) -> torch.Tensor:
        """Teacher-forced next-token logits (fp32, `[len(continuation) + 1, vocab]`) under a method.

        Row 0 is the distribution after the prompt, row i after `continuation[:i]`: what fidelity
        measures (e.g. KL of a method vs dense along the dense tokens) need.
        """
        method = self.method if method is None else resolve_method(method)
        ids = self.encode(prompt)
        self._check_lengths(len(ids), len(continuation) + 1)
        model = self.model
        policy = method.start(Run(model.spec, len(ids), len(continuation) + 1, model.device, model.dtype, model.scale))
        keys_attended = [0] * model.spec.num_layers
        with torch.inference_mode():
            kv, logits = self._prefill(ids, len(continuation) + 1, policy, Stats(method=method.settings()))
            rows = [logits]
            for i, token in enumerate(continuation):
                rows.append(self._decode(int(token), len(ids) + i, kv, policy, keys_attended))
        return torch.stack(rows)

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, or its chat template)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: pass some text or token ids")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError("chat=True but this tokenizer has no chat template; pass chat=False")
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                return list(ids)
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: pass some text or token ids")
        vocab = self.model.spec.vocab_size
        if not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise TypeError(f"a token-id prompt must be a list of ints in [0, {vocab}); got {ids[:8]}...")
        return ids

    # -- the loop --------------------------------------------------------------------------------------
    def _pieces(self, prompt, max_new_tokens, sampling, stop, chat, method):
        method = self.method if method is None else resolve_method(method)
        ids = self.encode(prompt, chat)
        self._check_lengths(len(ids), max_new_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        model = self.model
        run = Run(model.spec, len(ids), max_new_tokens, model.device, model.dtype, model.scale)
        policy = method.start(run)
        stats = Stats(method=method.settings(), prompt_tokens=len(ids))
        text = TextStream(self.tokenizer, stops)
        generator = sampling.generator(model.device)
        eos = self._eos_ids()
        new_ids: list[int] = []
        step_times: list[float] = []
        keys_attended = [0] * model.spec.num_layers
        finish = "length"

        with torch.inference_mode():
            start = self._now()
            kv, logits = self._prefill(ids, max_new_tokens, policy, stats)
            token = sampling.pick(logits, generator)
            stats.ttft_s = self._now() - start
            while True:
                new_ids.append(token)
                if token in eos:
                    finish = "eos"
                    break
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    finish = "stop"
                    break
                if len(new_ids) == max_new_tokens:
                    break
                start = self._now()
                logits = self._decode(token, len(ids) + len(new_ids) - 1, kv, policy, keys_attended)
                token = sampling.pick(logits, generator)
                step_times.append(self._now() - start)
        tail = text.flush()
        if tail:
            yield tail

        steps = max(1, len(step_times))
        stats.new_tokens = len(new_ids)
        stats.tpot_s = sum(step_times) / steps
        stats.decode_keys_per_layer = [n / steps for n in keys_attended]
        stats.kv_bytes_device = sum(layer.nbytes for layer in kv) + policy.device_bytes()
        stats.kv_bytes_host = policy.host_bytes()
        stats.revived_tokens = policy.revived_tokens()
        stats.method_stats = policy.stats()
        self.last_generation = Generation(text=text.text, token_ids=new_ids, stats=stats, finish_reason=finish)
        return self.last_generation

    def _prefill(self, ids: list[int], max_new_tokens: int, policy: Policy, stats: Stats):
        """Run the prompt through every layer; returns the per-layer KV and the last position's logits."""
        model = self.model
        spec = model.spec
        tokens = torch.tensor(ids, device=model.device)
        h = model.embed(tokens)
        pos = torch.arange(len(ids), device=model.device)
        rows = Rows(h, pos)
        kv = [LayerKV(spec.num_kv_heads, spec.head_dim, model.dtype, model.device) for _ in range(spec.num_layers)]
        for layer in range(spec.num_layers):
            stats.prefill_tokens_per_layer.append(len(rows))
            q, k, v = model.qkv(layer, rows.h, rows.pos)
            kv[layer].append(k, v, rows.pos, reserve=max_new_tokens)
            rows = rows.with_h(model.attention_output(layer, rows.h, model.causal_attention(layer, q, k, v)))
            rows = _keep(rows, policy.prefill_keep_after_attention(layer, rows, q, k))
            rows = rows.with_h(model.mlp(layer, rows.h))
            rows = _keep(rows, policy.prefill_keep_after_layer(layer, rows, q, k))
            policy.prefill_layer_done(layer, kv[layer])
        return kv, model.logits(rows.h[-1])

    def _decode(self, token: int, position: int, kv: list[LayerKV], policy: Policy, keys_attended: list[int]):
        """One decode step for `token` at `position`; returns the next-token logits."""
        model = self.model
        h = model.embed(torch.tensor([token], device=model.device))
        pos = torch.tensor([position], device=model.device)
        rows = Rows(h, pos)
        for layer in range(model.spec.num_layers):
            rows = policy.decode_rows(layer, rows)
            q, k, v = model.qkv(layer, rows.h, rows.pos)
            kv[layer].append(k, v, rows.pos)
            context = policy.decode_context(layer, q, rows, kv[layer])
            keys_attended[layer] += len(context)
            out = model.attend(layer, q, rows.pos, context.k, context.v, context.pos, context.hidden)
            rows = rows.with_h(model.mlp(layer, model.attention_output(layer, rows.h, out)))
            rows = policy.decode_layer_done(layer, rows, q, context)
        policy.decode_step_done()
        return model.logits(rows.h[-1])

    # -- helpers ---------------------------------------------------------------------------------------
    def _check_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        total, limit = prompt_len + max_new_tokens, self.model.spec.max_positions
        if total > limit:
            raise ValueError(
                f"prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) is {total} tokens, beyond "
                f"the model's {limit} positions: shorten the prompt or ask for fewer new tokens"
            )
        window = self.model.sliding_window
        if window is not None and total > window:
            raise ValueError(
                f"{total} tokens exceed this model's sliding attention window ({window}); tokensieve runs "
                f"full attention only, so keep prompt plus new tokens within {window}"
            )

    def _eos_ids(self) -> set[int]:
        found = {self.tokenizer.eos_token_id, self.model.config.eos_token_id}
        ids: set[int] = set()
        for item in found:
            ids.update(item if isinstance(item, list) else [item])
        return {i for i in ids if i is not None}

    def _now(self) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()


def _keep(rows: Rows, index: torch.Tensor | None) -> Rows:
    if index is None:
        return rows
    if int(index[-1]) != len(rows) - 1:
        raise RuntimeError("a policy dropped the last prompt token, which produces the first output token")
    return rows.select(index)
