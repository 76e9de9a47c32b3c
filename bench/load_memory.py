"""Peak memory of loading a checkpoint: how many copies of the weights does loading hold at once?

Each load runs in a fresh Python process, which reads its resident set size after the imports
(VmRSS) and its peak (ru_maxrss) after `from_pretrained`; the row shows the peak increase divided
by the bytes of the loaded parameters (1.0 = one copy of the weights; 2.0 = the model was built
twice), and the same for private memory (RssAnon, sampled every 2 ms during the load), which
leaves out the memory-mapped file pages the kernel can drop. Rows: the quickstart model (runs/quickstart/final, skipped when absent) and a random-weight
EVE v1 model of about 1 GB in bfloat16, written in 256 MB safetensors shards with an index (as
big checkpoints are). The safetensors files are memory-mapped: pages read from them count in
the RSS while mapped, so one copy of the weights is the floor, not zero.

    python bench/load_memory.py [--layers 14] [--hidden 1536] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from eve_vlm import EveConfig, EveForCausalLM

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "runs" / "quickstart" / "final"
SHARD_BYTES = 256 * 2**20

# The child: imports first, then its RSS, then one load, then its peak RSS (Linux, kB units).
CHILD = r"""
import json, resource, sys, threading, torch
import transformers
from eve_vlm import EveForCausalLM

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

# RssAnon (private memory, what a copy of the weights costs) has no kernel peak counter: sample it.
peak_anon, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))
        done.wait(0.002)
path, mode = sys.argv[1], sys.argv[2]
before, before_anon = status_kb("VmRSS"), status_kb("RssAnon")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
if mode == "default":
    model = EveForCausalLM.from_pretrained(path)
elif mode == "hf-bf16":
    model = EveForCausalLM.from_pretrained(
        path, torch_dtype=torch.bfloat16, device_map="auto", low_cpu_mem_usage=True
    )
elif mode == "auto-bf16":
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch.bfloat16, device_map="auto", low_cpu_mem_usage=True
    )
else:
    raise SystemExit(f"unknown mode {mode}")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done.set(); sampler.join()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before_kb": before, "peak_kb": peak, "weight_bytes": weights,
                  "before_anon_kb": before_anon, "peak_anon_kb": max(peak_anon[0], status_kb("RssAnon")),
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=14, help="decoder layers of the random model")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size of the random model")
    p.add_argument("--keep", type=Path, default=None, help="write the random model here (else a temp dir)")
    return p.parse_args()


def write_random_sharded(folder: Path, layers: int, hidden: int) -> int:
    """A random-weight v1 (Llama family) checkpoint in bf16 shards; returns its weight bytes.

    The model is built on the meta device for its parameter names and shapes only, and each
    shard's tensors are made and written in turn, so writing never holds the whole model.
    """
    config = EveConfig(
        version="v1",
        family="llama",
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vision_hidden_size=1024,
        patch_stride=14,
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        meta = EveForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = [EveForCausalLM.__name__]
    config.save_pretrained(folder)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shard.items()}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def measure(path: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"loading {path} ({mode}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, mode: str, r: dict) -> str:
    total = max(r["peak_kb"] - r["before_kb"], 0) * 1024
    anon = max(r["peak_anon_kb"] - r["before_anon_kb"], 0) * 1024
    w = r["weight_bytes"]
    return (
        f"| {label} | {mode} | {r['dtype'].removeprefix('torch.')} | {w / 2**20:,.0f} | "
        f"{total / 2**20:,.0f} | {total / w:.2f} | {anon / 2**20:,.0f} | {anon / w:.2f} |"
    )


def main() -> None:
    args = parse_args()
    print(
        "| model | load | dtype | weights MiB | peak RSS increase MiB | copies (RSS) "
        "| peak private (RssAnon) increase MiB | copies (private) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    if QUICKSTART.is_dir():
        for mode in ("default", "hf-bf16"):
            print(row("quickstart (SmolLM2-135M, fp32 file)", mode, measure(QUICKSTART, mode)), flush=True)
    else:
        print(f"| quickstart | skipped: no {QUICKSTART} | | | | | | |")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "random"
        total = write_random_sharded(folder, args.layers, args.hidden)
        n_shards = len(list(folder.glob("model-*.safetensors")))
        label = f"random v1, {total / 2**30:.2f} GiB bf16 in {n_shards} shards"
        for mode in ("default", "hf-bf16", "auto-bf16"):
            print(row(label, mode, measure(folder, mode)), flush=True)


if __name__ == "__main__":
    main()
