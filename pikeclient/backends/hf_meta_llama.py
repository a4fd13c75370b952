"""A local causal language model through Hugging Face transformers (Meta Llama or any other).

The only module that imports torch and transformers. All generation runs on one worker thread, so the
event loop never blocks; concurrent async requests with the same sampling settings are grouped into
left-padded batches, which give the same greedy output as one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from pikeclient.backends import _torch_env
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import BadRequestError, ConfigError, ContextWindowError, ModelError, one_line
from pikeclient.core.types import Completion, Message, SamplingParams, Usage, text_messages

log = logging.getLogger(__name__)

WARMUP_STEPS = 16  # tokens a warm-up batch generates
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str) -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that support it, float16 on other accelerators, float32 on CPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"llm.dtype={dtype!r}: allowed auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


class _StepTimer(BaseStreamer):
    """Notes when each generation step's tokens come out (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts = 0
        self.steps: list[float] = []  # perf_counter when new token k (0-based) of every row was made

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts > 1:
            self.steps.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def ttft(self) -> float | None:
        return self.steps[0] - self.start if self.steps else None

    def decode_s(self, tokens: int) -> float | None:
        """From a row's first token to its own last one (its end-of-sequence token included, as a server
        finishes a request there): a short answer in a batch does not take on the steps the batch went
        on for (its latency, the batch's end, does)."""
        if tokens < 1 or tokens > len(self.steps):
            return None
        return self.steps[tokens - 1] - self.steps[0]


@dataclass
class _Request:
    prompt_ids: list[int]
    future: asyncio.Future


class HFLocalClient(BaseLLMClient):
    """A causal LM loaded with ``from_pretrained`` from a local folder or a hub id.

    Args:
        model: local path or hub id.
        device: ``auto`` (cuda, then mps, then cpu) or a torch device string.
        dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32``.
        trust_remote_code: run code shipped with the checkpoint (off unless you trust it).
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; None lets transformers pick.
        batch_size: most concurrent requests generated together.
        tokenizer: tokenizer folder or id when it differs from ``model``.
        gguf_file: a GGUF file's name inside ``model`` (a folder or hub id); transformers dequantizes
            it on every load (slow): convert once with :func:`pikeclient.backends.smollm2.convert_gguf` to reuse.
        threads: torch's CPU threads (process-wide); None: half the cores this process may run on, at
            least one (the rest are left to the event loop, the tracking process and other work).
    """

    provider = "hf_local"
    computes_locally = True

    def __init__(
        self,
        *,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        batch_size: int = 8,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        threads: int | None = None,
        **common: Any,
    ) -> None:
        super().__init__(model=model, **common)
        if batch_size < 1:
            raise ConfigError(f"llm.batch_size={batch_size} is out of range: allowed >= 1")
        if threads is not None and threads < 1:
            raise ConfigError(f"llm.threads={threads} is out of range: allowed >= 1 (null: half the available cores)")
        # torch's default is the machine's physical cores, which a cpuset or taskset may not allow.
        torch.set_num_threads(threads or _torch_env.default_threads())
        self.batch_size = batch_size
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        # A GGUF file carries its tokenizer too: use it unless another tokenizer is named.
        self.tokenizer = _load_tokenizer(tokenizer or model, trust_remote_code, None if tokenizer else gguf_file)
        self.lm = _load_model(model, self.device, self.dtype, trust_remote_code, attn_implementation, gguf_file)
        if self.context_window is None:
            self.context_window = getattr(self.lm.config, "max_position_embeddings", None)
        self._eos_ids = _eos_ids(self.lm, self.tokenizer)
        self._lock = threading.Lock()  # one generate at a time on the model
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._pending: list[tuple[_Request, SamplingParams]] = []
        self._draining = False

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # -- prompts and tokens ------------------------------------------------------------------------

    def encode_messages(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the model's input: the chat template applied, or a plain prompt as is."""
        messages = text_messages(messages)  # a list of parts as the text it holds: templates read strings
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif len(messages) == 1 and messages[0].get("role") == "user":
            ids = self.tokenizer(messages[0]["content"])["input_ids"]  # a plain prompt
        else:
            raise BadRequestError(f"{self.model} has no chat template: pass a plain prompt, not chat messages")
        if self.context_window and len(ids) >= self.context_window:
            raise ContextWindowError(f"prompt has {len(ids)} tokens; the context window of {self.model} is "
                                     f"{self.context_window}")
        return ids

    @property
    def measures_ttft(self) -> bool:
        return True  # the step timer sees the first token come out

    @property
    def default_warmup(self) -> int:
        # One batch: the first generations pay for kernel selection and allocator growth (15 s vs 3 s).
        return self.batch_size

    @property
    def warmup_sampling(self) -> dict[str, Any]:
        # 16 steps of a full batch pay those costs: SmolLM2's first measured 128-token batch then took
        # 13.8-14.1 s, its second 14.3-14.5 s (after 4 steps: 15.3-15.6 s); a full-length warm-up took 14 s.
        steps = min(WARMUP_STEPS, self.sampling.max_tokens)
        return {"max_tokens": steps, "min_tokens": steps}

    def get_token_count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_message_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.encode_messages(messages))

    # -- one attempt --------------------------------------------------------------------------------

    def _complete(self, messages: list[Message], params: SamplingParams) -> Completion:
        # Sync calls run on the same worker thread as batches: torch keeps one OpenMP thread team per
        # calling thread, and a second team spin-waiting on the same cores halves the first one's speed.
        return self._worker.submit(self.generate_batch, [self.encode_messages(messages)], params).result()[0]

    async def _acomplete(self, messages: list[Message], params: SamplingParams) -> Completion:
        loop = asyncio.get_running_loop()
        request = _Request(self.encode_messages(messages), loop.create_future())
        self._pending.append((request, params))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await request.future

    async def _drain(self) -> None:
        """Run pending requests in batches until none are left; batches share sampling settings."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                await asyncio.sleep(0)  # let requests submitted in the same tick join this batch
                params = self._pending[0][1]
                batch = [r for r, p in self._pending if p == params][: self.batch_size]
                self._pending = [(r, p) for r, p in self._pending if r not in batch]
                try:
                    ids = [r.prompt_ids for r in batch]
                    results = await loop.run_in_executor(self._worker, self.generate_batch, ids, params)
                except Exception as error:  # noqa: BLE001 - handed to every caller of the batch
                    for request in batch:
                        _settle(request.future, error=error)
                    continue
                for request, result in zip(batch, results):
                    _settle(request.future, result=result)
        finally:
            self._draining = False

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate for several tokenized prompts at once (left padding, attention mask)."""
        with self._lock:
            try:
                return self._generate(prompts, params)
            except torch.OutOfMemoryError as error:
                raise ModelError(f"out of memory generating {len(prompts)} prompt(s) on {self.device}: "
                                 "lower llm.batch_size or sampling.max_tokens") from error

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        timer = _StepTimer()
        with torch.inference_mode():
            output = self.lm.generate(**batch, **self._generation_args(params), streamer=timer)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        return [self._completion(row, len(prompt), params, timer) for row, prompt in zip(new_tokens, prompts)]

    def stream(self, messages: Sequence[Message], **sampling: Any) -> Iterator[str]:
        """Yield the answer's text as it is generated (no retry: a local model fails deterministically)."""
        messages, params = self._prepare(messages, sampling)
        ids = torch.tensor([self.encode_messages(messages)], device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        args = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "streamer": streamer,
                **self._generation_args(params)}

        def run() -> None:
            with self._lock, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                self.lm.generate(**args)

        future = self._worker.submit(run)
        yield from (piece for piece in streamer if piece)
        future.result()  # re-raise a generation error

    def _generation_args(self, params: SamplingParams) -> dict[str, Any]:
        args: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "min_new_tokens": params.min_tokens or 0,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(self._eos_ids),
        }
        if params.temperature == 0:
            # Greedy; the checkpoint's generation_config may say otherwise, so say it explicitly.
            args.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            args.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        if params.repetition_penalty is not None:
            args["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            args.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return args

    def _completion(self, tokens: list[int], prompt_len: int, params: SamplingParams, timer: _StepTimer) -> Completion:
        generated, finish = self._trim(tokens)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        for stop in params.stop or ():
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        # The end-of-sequence token is not counted, as servers count (llama.cpp, vLLM): the same
        # answer gets the same completion_tokens locally and from a server.
        usage = Usage(prompt_tokens=prompt_len, completion_tokens=len(generated), source="tokenizer")
        return Completion(text=text, finish_reason="stop" if finish == "stop_eos" else finish, usage=usage,
                          ttft_s=timer.ttft, model=self.model,
                          decode_s=timer.decode_s(len(generated) + (finish == "stop_eos")))

    def _trim(self, tokens: list[int]) -> tuple[list[int], str]:
        """Generated tokens without padding, and why generation ended for this row."""
        pad = self.tokenizer.pad_token_id
        for index, token in enumerate(tokens):
            if token in self._eos_ids:
                return tokens[:index], "stop_eos"  # the eos itself was generated: neither counted nor shown
            if token == pad:
                return tokens[:index], "stop"  # row finished early (stop string) and was padded
        return tokens, "length"


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the caller gave up (cancelled) while the batch ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _eos_ids(lm: Any, tokenizer: Any) -> set[int]:
    configured = lm.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _load_tokenizer(name: str, trust_remote_code: bool, gguf_file: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"cannot load tokenizer {name!r}: {one_line(error)}") from error
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
                attn_implementation: str | None, gguf_file: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        lm = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"cannot load model {name!r}: {one_line(error)}") from error
    except torch.OutOfMemoryError as error:
        raise ModelError(f"out of memory loading {name!r} on {device}: try a smaller dtype") from error
    log.info("loaded %s on %s (%s)", name, device, dtype)
    return lm.to(device).eval()

