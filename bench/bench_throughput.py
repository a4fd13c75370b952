"""Async throughput: pikeclient's runner (retry and token counting on, tracking off) vs the raw SDK.

    python bench/bench_throughput.py [--calls 1000] [--latency 0.1] [--concurrency 32] [--no-append]
                                     [--litellm-python PATH]

The raw baseline is ``openai.AsyncOpenAI`` with an asyncio semaphore, the same prompts, the same
loopback server process. Also printed: the ideal wall time, calls x latency / concurrency, and LiteLLM
as a further peer when it is installed. LiteLLM pins ``openai<3``, so it cannot share pikeclient's
environment: give ``--litellm-python`` the interpreter of a separate venv with ``pip install litellm``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import API_KEY, REPO, interleaved_medians, loopback_server, ratio, write_prompts  # noqa: E402
from bench._report import command_line, emit  # noqa: E402

# Each contender runs in a fresh process; it prints its wall time (s) for the calls.
PIKECLIENT = """
import asyncio, sys, time
sys.path.insert(0, {repo!r})
from pikeclient.backends.openai import OpenAIClient
from pikeclient.run.dataset import load_prompts
from pikeclient.run.runner import run_prompts
url, dataset, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = load_prompts(dataset)
client = OpenAIClient(model="gpt-4o-mini", base_url=url, sampling={{"max_tokens": 64}},
                      retry={{"max_attempts": 4, "initial_delay": 0.01}})
start = time.perf_counter()
stats = asyncio.run(run_prompts(client, prompts, concurrency))
assert stats.ok == len(prompts) and stats.prompt_tokens > 0, stats
print(time.perf_counter() - start)
"""

RAW_SDK = """
import asyncio, json, sys, time
import openai
url, dataset, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [json.loads(line)["prompt"] for line in open(dataset)]

async def main():
    client = openai.AsyncOpenAI(base_url=url, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with gate:
            # The same request body pikeclient sends: its sampling settings are always explicit.
            r = await client.chat.completions.create(model="gpt-4o-mini", max_tokens=64, temperature=0.0,
                                                     top_p=1.0, messages=[{{"role": "user", "content": prompt}}])
            return r.choices[0].message.content

    answers = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    assert all(answers)

start = time.perf_counter()
asyncio.run(main())
print(time.perf_counter() - start)
"""

LITELLM = """
import asyncio, json, sys, time
import litellm
url, dataset, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [json.loads(line)["prompt"] for line in open(dataset)]

async def main():
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with gate:
            r = await litellm.acompletion(model="openai/gpt-4o-mini", api_base=url, max_tokens=64,
                                          temperature=0.0, top_p=1.0,
                                          messages=[{{"role": "user", "content": prompt}}])
            return r.choices[0].message.content

    await asyncio.gather(*(one(p) for p in prompts))

start = time.perf_counter()
asyncio.run(main())
print(time.perf_counter() - start)
"""


def contender(code: str, url: str, dataset: Path, concurrency: int, python: str = sys.executable) -> float:
    # LITELLM_LOCAL_MODEL_COST_MAP: LiteLLM would otherwise fetch its price list from GitHub on import.
    env = {"OPENAI_API_KEY": API_KEY, "PATH": "", "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run([python, "-c", code.format(repo=str(REPO)), url, str(dataset), str(concurrency)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def litellm_versions(python: str) -> str | None:
    """"litellm X, openai Y" in ``python``'s environment, or None when litellm is not installed there."""
    code = ("import importlib.metadata as m, litellm; "
            "print(f\"litellm {m.version('litellm')}, openai {m.version('openai')}\")")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PATH": ""}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else None


def measure(calls: int, latency: float, concurrency: int, repeats: int, litellm_python: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, loopback_server(latency) as url:
        dataset = write_prompts(Path(tmp) / "prompts.jsonl", calls)
        runs = {name: functools.partial(contender, code, url, dataset, concurrency)
                for name, code in {"raw openai.AsyncOpenAI + semaphore": RAW_SDK, "pikeclient run_prompts": PIKECLIENT}.items()}
        if versions := litellm_versions(litellm_python):
            runs[f"litellm.acompletion + semaphore ({versions})"] = functools.partial(contender, LITELLM, url, dataset, concurrency,
                                                                        litellm_python)
        return interleaved_medians(runs, repeats)


def main() -> None:
    parser = command_line(__doc__, calls=1000, latency=0.1, concurrency=32, repeats=3)
    parser.add_argument("--litellm-python", default=sys.executable, help="interpreter with litellm installed")
    args = parser.parse_args()
    walls = measure(args.calls, args.latency, args.concurrency, args.repeats, args.litellm_python)
    raw = walls["raw openai.AsyncOpenAI + semaphore"]
    ideal = args.calls * args.latency / args.concurrency
    rows = [("calls, server latency, concurrency", f"{args.calls}, {args.latency:g} s, {args.concurrency}"),
            ("ideal (calls x latency / concurrency)", f"{ideal:.2f} s")]
    rows += [(name, f"{wall:.2f} s ({ratio(wall, raw)} raw SDK)") for name, wall in walls.items()]
    rows.append(("target", "pikeclient <= 1.05x raw SDK"))
    emit(f"Async throughput ({args.calls} calls, latency {args.latency:g} s, "
                      f"concurrency {args.concurrency}); median of {args.repeats}", rows, to_results=not args.no_append)


if __name__ == "__main__":
    main()
