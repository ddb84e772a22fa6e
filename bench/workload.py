"""The shared peer-benchmark workload of `shared/bench/WORKLOAD.md`, built exactly, for every benchmark.

One place builds the 128-id tokenizer, the addition prompts, the seed-0 weights (framework-neutral
NumPy arrays in HF names and layouts), the HF torch model and the r1jax model from those same
arrays, and the reward, plus the measuring helpers the benchmarks share (wall and CPU time of a call, the
achieved fp32 matmul roofline). `bench/sampler.py` and `bench/grpo_step.py` import it:

    from bench.workload import build_tokenizer, prompts, hf_model, r1jax_model, reward, matmul_roofline

`transformers`/`torch` are imported lazily (bench/test-only dependencies); `r1jax_model()` needs
neither. `python -m bench.workload` checks that HF and r1jax logits agree (≤ 1e-5 relative).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB_SIZE = 128
PROMPT_TOKENS = 16
PROMPT_SEED = 1234
WEIGHT_SEED = 0
TORCH_THREADS = 2
MODEL_PRESET = "bench-qwen2-3m"  # r1jax's preset of this model (vocab 128, d 256, 4 layers, 4/2 heads, MLP 768)

# The HF Qwen2 config of WORKLOAD.md's table.
HF_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=768, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10_000.0,
    max_position_embeddings=512, tie_word_embeddings=True, use_sliding_window=False,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)


# ------------------------------------------------------------------------------------ tokenizer


def vocabulary() -> dict[str, int]:
    """token → id: 4 specials, 3 words, the 95 printable ASCII characters, 26 filler specials."""
    vocab = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID, "<unk>": UNK_ID, "What": 4, "is": 5, "Answer": 6}
    vocab.update({chr(c): c - 25 for c in range(32, 127)})
    vocab.update({f"<x_{chr(ord('a') + i)}>": 102 + i for i in range(26)})
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    return vocab


def build_tokenizer():
    """The WordLevel tokenizer wrapped in `transformers.PreTrainedTokenizerFast` (decode skips specials)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    specials = [t for t in vocab if t.startswith("<")]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"What|Answer|is|[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    tok.decoder = decoders.Fuse()

    class WorkloadTokenizer(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs):
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    return WorkloadTokenizer(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------ prompts and reward


class Prompt(NamedTuple):
    text: str
    answer: str


def prompts(n: int, start: int = 0) -> list[Prompt]:
    """Prompts `start … start+n-1` of the fixed stream (GRPO step k uses `prompts(8, 8 * (k - 1))`)."""
    rng = np.random.default_rng(PROMPT_SEED)
    out = []
    for _ in range(start + n):
        a, b = (int(x) for x in rng.integers(10, 100, size=2))
        out.append(Prompt(f"What is {a} + {b}? Answer:", str(a + b)))
    return out[start:]


def reward(completion_text: str, answer: str) -> float:
    """1.0 if some maximal run of digits in the completion equals the answer, else 0.0."""
    return 1.0 if answer in re.findall(r"\d+", completion_text) else 0.0


# ------------------------------------------------------------------------------------ weights and models


def hf_weights() -> dict[str, np.ndarray]:
    """The seed-0 weights in HF names and `[out, in]` layouts, drawn in WORKLOAD.md's order."""
    rng = np.random.default_rng(WEIGHT_SEED)
    c = HF_CONFIG
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]

    def draw(shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    w = {"model.embed_tokens.weight": draw((v, d))}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)), ("self_attn.v_proj", (kv, d)),
                            ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                            ("mlp.down_proj", (d, f))):
            w[p + name + ".weight"] = draw(shape)
        for name, n in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            w[f"{p}self_attn.{name}.bias"] = np.zeros(n, np.float32)
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    w["model.norm.weight"] = np.ones(d, np.float32)
    return w


def hf_model(attn: str = "sdpa"):
    """`transformers.Qwen2ForCausalLM` (torch, fp32, 2 intra-op threads), eval mode. `attn`: its
    attention implementation; transformers' default `sdpa` is the faster one here (on the generation
    workload 4.0k tokens/s against 3.1k for `eager`, interleaved in one process)."""
    import torch
    import transformers

    torch.set_num_threads(TORCH_THREADS)
    cfg = transformers.Qwen2Config(**HF_CONFIG, attn_implementation=attn, dtype=torch.float32)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    weights = {k: torch.from_numpy(a) for k, a in hf_weights().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"workload weights do not fit Qwen2ForCausalLM: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def write_hf_folder(folder: str | Path) -> Path:
    """The weights as an HF checkpoint folder (config.json + model.safetensors), without torch."""
    from safetensors.numpy import save_file

    from r1jax.model import get_preset, to_hf_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_weights(), folder / "model.safetensors", metadata={"format": "pt"})
    config = to_hf_config(get_preset(MODEL_PRESET), bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def r1jax_model(mesh=None, **config_overrides):
    """The r1jax `Transformer` with the same weights (through `load_hf`), placed on `mesh` if given."""
    from r1jax.model import get_preset, load_hf

    with tempfile.TemporaryDirectory() as tmp:
        model = load_hf(write_hf_folder(tmp), mesh, **config_overrides)
    if model.cfg != get_preset(MODEL_PRESET, **config_overrides):
        raise RuntimeError(f"loaded config {model.cfg} differs from preset {MODEL_PRESET!r}")
    return model


def encode_prompts(tokenizer, texts: list[str]) -> np.ndarray:
    """[n, 16] int32 token ids of the (always 16-token) prompts."""
    ids = tokenizer(texts)["input_ids"]
    if any(len(x) != PROMPT_TOKENS for x in ids):
        got = sorted({len(x) for x in ids})
        raise ValueError(f"workload prompts must be {PROMPT_TOKENS} tokens: got lengths {got}")
    return np.asarray(ids, np.int32)


# ------------------------------------------------------------------------------------ measuring


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(). CPU time counts every thread of the process: on a
    shared machine it depends much less on the other jobs than wall time does."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's name with its family and model numbers (peer ratios differ between CPUs: an
    AMD Zen 5 and an Intel Sapphire Rapids gave 3.5× and 2.2× on the same sampler benchmark); the
    machine type where /proc/cpuinfo is missing."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return platform.machine()
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def run_header() -> str:
    """The first line of a benchmark's output: date, processor, CPU count, load average, JAX and its devices."""
    import jax

    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_model()}, {os.cpu_count()} CPUs, load average "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; jax {jax.__version__} "
            f"({jax.devices()[0].platform} × {jax.device_count()})")


def cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time of the whole machine since boot, in jiffies, from /proc/stat (None where
    there is no such file). Steal is time the hypervisor gave this VM's vCPUs to other guests."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_report(start: tuple[int, int] | None) -> str:
    """The host's steal time since `start` (a `cpu_jiffies()` reading), as a line for a benchmark's
    output: with steal time above a few per cent the peers' timings are not like-for-like (torch's
    spinning OpenMP threads lose more than XLA's when the host takes cores)."""
    end = cpu_jiffies()
    if start is None or end is None or end[1] == start[1]:
        return "host steal time during the run: unknown"
    return f"host steal time during the run: {(end[0] - start[0]) / (end[1] - start[1]):.0%} of CPU time"


def matmul_roofline(n: int = 2048, repeats: int = 5, backend: str = "jax") -> tuple[float, float]:
    """Best achieved fp32 FLOP/s of an [n, n] @ [n, n] matmul: (per wall second, per CPU second).

    backend "jax": a jitted `jnp.dot` on the default device (the roofline the benchmarks report);
    "torch": `torch.mm` with the current intra-op threads (what the torch peers can reach).
    """
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm = jax.jit(jnp.dot)
        run = lambda: mm(a, b).block_until_ready()
    elif backend == "torch":
        import torch

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        run = lambda: torch.mm(a, b)
    else:
        raise ValueError(f"backend={backend!r}; accepted: 'jax', 'torch'")
    run()
    times = [timed(run) for _ in range(repeats)]
    return 2 * n**3 / min(t[0] for t in times), 2 * n**3 / min(t[1] for t in times)


def check_parity(batch: int = 8, tol: float = 1e-5) -> float:
    """Max relative difference of HF and r1jax logits on the first `batch` prompts; raises above `tol`."""
    import jax
    import jax.numpy as jnp
    import torch

    tok = build_tokenizer()
    ids = encode_prompts(tok, [p.text for p in prompts(batch)])
    with torch.no_grad():
        ref = hf_model()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(r1jax_model()(jnp.asarray(ids)))
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    if not err <= tol:
        raise AssertionError(f"HF vs r1jax logits: relative error {err:.3g} > {tol}")
    return err


if __name__ == "__main__":
    tok = build_tokenizer()
    first = prompts(4)
    print("first prompts:", [p.text for p in first])
    print("ids[0]:", tok(first[0].text)["input_ids"])
    print("HF vs r1jax logits, max relative error:", check_parity())
