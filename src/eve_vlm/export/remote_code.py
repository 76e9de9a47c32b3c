"""`eve export MODEL OUT --remote-code`: a folder `transformers` loads with `trust_remote_code=True`
where eve_vlm is not installed.

The modelling files are generated from this package's own `model/` modules (the closure of
`model/eve.py`'s relative imports), with imports from outside `model/` made local, so the
exported code is exactly the code that was tested here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]  # src/eve_vlm
ENTRY = "model/eve.py"
AUTO_MAP = {
    "AutoConfig": "config.EveConfig",
    "AutoModelForCausalLM": "eve.EveForCausalLM",
    "AutoModelForImageTextToText": "eve.EveForCausalLM",
}
_RELATIVE = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\b)", re.MULTILINE)


def _resolve(importer: str, dots: str, name: str) -> str:
    """Package-relative path (e.g. "model/decoder.py") of a relative import in `importer`."""
    base = Path(importer).parent
    for _ in range(len(dots) - 1):
        base = base.parent
    target = base.joinpath(*name.split(".")) if name else base
    return (target.with_suffix(".py")).as_posix()


def modelling_sources() -> dict[str, str]:
    """{file name: source} of every module `model/eve.py` needs, imports flattened to one folder."""
    out: dict[str, str] = {}
    todo = [ENTRY]
    while todo:
        rel = todo.pop()
        flat = Path(rel).name
        if flat in out:
            continue
        src = (PACKAGE / rel).read_text()

        def local(m: re.Match[str], rel: str = rel) -> str:
            target = _resolve(rel, m.group(2), m.group(3))
            if not (PACKAGE / target).is_file():
                raise FileNotFoundError(f"{rel} imports {m.group(0).strip()}, which is not a module file")
            todo.append(target)
            return f"{m.group(1)}.{Path(target).stem}{m.group(4)}"

        out[flat] = _RELATIVE.sub(local, src)
    return out


def export_remote_code(model_dir: str | Path, out: str | Path) -> Path:
    """Write `model_dir` (ours or a released checkpoint) to `out` in our format, with the
    modelling files and an `auto_map` in config.json."""
    from ..model.eve import EveForCausalLM

    model_dir, out = Path(model_dir), Path(out)
    model = EveForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(out)
    for f in model_dir.iterdir():  # processor, tokenizer, generation config
        if f.is_file() and f.name != "config.json" and not f.name.startswith(("model", "pytorch_model")) and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    for name, source in modelling_sources().items():
        (out / name).write_text(source)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = AUTO_MAP
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("wrote a remote-code export of %s to %s", model_dir, out)
    return out
