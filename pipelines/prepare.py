"""DVC stage `prepare`: materialise the base model (hub id, local folder or the embedded GGUF,
converted once) as a plain transformers folder at artifacts/base/model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from lsp.errors import exit_on_input_error
from lsp.models import resolve_model
from lsp.study.params import BASE_MODEL, load_params
from lsp.study.timings import timed


@exit_on_input_error
@timed(lambda: "prepare")
def main() -> None:
    params = load_params()
    source = resolve_model(params.model.policy, params.model.cache_dir)
    BASE_MODEL.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=BASE_MODEL.parent)
    files = [f for f in os.listdir(source) if not f.startswith(".") and f != "lsp_model.json"]
    for name in files:  # copy into a temporary folder, then rename: never a half folder
        path = os.path.join(source, name)
        (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, os.path.join(tmp, name))
    info = {"spec": params.model.policy, "source": str(source), "files": sorted(files)}
    with open(os.path.join(tmp, "lsp_base.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(BASE_MODEL, ignore_errors=True)
    os.replace(tmp, BASE_MODEL)
    print(f"base model {params.model.policy} -> {BASE_MODEL}")


if __name__ == "__main__":
    main()
