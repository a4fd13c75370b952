"""API-only users never import torch or transformers; only the tracking process imports mlflow; the
package's folders import only downwards (core <- backends <- config <- eval <- tracking <- run <- cli <- integrations)."""

import subprocess
import sys

from tests.conftest import API_KEY


def modules_after(code: str, cwd=None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"], cwd=cwd,
                         capture_output=True, text=True, check=True, env={"OPENAI_API_KEY": API_KEY, "PATH": ""})
    return set(out.stdout.split())


def test_import_pikeclient_leaves_heavy_modules_out():
    loaded = modules_after("import pikeclient")
    assert not {"torch", "transformers", "mlflow", "hydra"} & loaded


def test_api_backend_call_leaves_torch_out(server):
    code = (
        "from pikeclient.backends.openai import OpenAIClient\n"
        f"OpenAIClient(model='gpt-4o', base_url='{server.url}/v1').generate('hi')\n"
    )
    loaded = modules_after(code)
    assert "openai" in loaded and not {"torch", "transformers"} & loaded


def test_api_experiment_run_leaves_torch_out(server, tmp_path):
    code = (
        "import asyncio\n"
        "from pikeclient.backends.openai import OpenAIClient\n"
        "from pikeclient.run.runner import run_prompts\n"
        "from pikeclient.run.dataset import load_prompts\n"
        f"c = OpenAIClient(model='gpt-4o', base_url='{server.url}/v1')\n"
        "asyncio.run(run_prompts(c, load_prompts('pkg://pikeclient/data/prompts.jsonl'), 4))\n"
        "import pikeclient.tracking.process\n"
    )
    loaded = modules_after(code)
    assert "mlflow" in loaded and not {"torch", "transformers"} & loaded


def test_run_py_with_an_api_backend_never_imports_torch(server, tmp_path):
    from tests.conftest import REPO

    code = (
        "import runpy, sys\n"
        f"sys.argv = ['run.py', 'llm=openai', 'llm.base_url={server.url}/v1', 'dataset.limit=2', 'tracking=none']\n"
        f"runpy.run_path({str(REPO / 'run.py')!r}, run_name='__main__')\n"
    )
    loaded = modules_after(code, cwd=tmp_path)
    assert "pikeclient.run.experiment" in loaded and not {"torch", "transformers"} & loaded


def test_client_classes_are_exported_without_torch(server):
    code = (
        "from pikeclient import OpenAIClient, AzureOpenAIClient, AzureMetaLlamaClient, compose, create_client\n"
        f"assert OpenAIClient(model='gpt-4o', base_url='{server.url}/v1').generate('hi') == 'You said: hi'\n"
    )
    loaded = modules_after(code)
    assert not {"torch", "transformers"} & loaded


def test_hf_client_is_exported_lazily():
    loaded = modules_after("import pikeclient\nassert 'HFLocalClient' in pikeclient.__all__")
    assert "torch" not in loaded


# The package's folders by concern; each imports only from folders of a lower rank (or from itself).
# eval (answer quality) sits above config (its judge is a client built from config) and below tracking
# (which logs its scores as MLflow assessments) and run (which hands it each finished call).
# integrations (other projects running on pikeclient) sit on top: nothing in pikeclient imports them.
LAYERS = {"core": 0, "testing": 1, "backends": 1, "config": 2, "eval": 3, "tracking": 4, "run": 5, "cli": 6,
          "integrations": 7}


def test_every_import_points_down_the_layers():
    import ast

    from tests.conftest import REPO

    package = REPO / "pikeclient"
    upward = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package's lazy exports
        assert parts[0] in LAYERS, f"{path}: a module outside the layers {sorted(LAYERS)}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                group = name.split(".")[1] if name.startswith("pikeclient.") else None
                if group and group != parts[0] and LAYERS[group] >= LAYERS[parts[0]]:
                    upward.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not upward, "\n".join(upward)
