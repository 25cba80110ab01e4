"""The billion-parameter model of `cargo xtask bench --scale`: Llama-3.2-1B's configuration
(16 layers, 2048 wide, 32 query and 8 key/value heads, 8192-wide MLP, 128256-token
vocabulary, tied embeddings, Llama 3 RoPE scaling) with random weights, since only small
real weights ship in the package registries. Cost does not depend on the weights' values.

Run from the repository root with the reference stack (`bench/reference/setup.sh
target/ref-venv`; `cargo xtask bench --scale` runs both once):

    target/ref-venv/bin/python bench/scale/make_models.py target/scale

It writes `target/scale/llama-1b/` (never committed: 4.9 GB):
- `config.json`, `model.safetensors` (f32), `tokenizer.json`: as `save_pretrained` writes
  them (transformers' own initialisation, seeded), the tokenizer a byte-level BPE padded
  with unused tokens to the vocabulary's size;
- `model.q8_0.gguf`, `model.q4_0.gguf`: the same weights through the `gguf` package with
  llama.cpp's conventions (fixtures/architectures/gguf_writer.py), every matrix quantised,
  the token embeddings too (norms stay f32), as llama.cpp's `--pure` quantisation does.
"""

import json
import os
import sys

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "fixtures", "architectures"))
import gguf_writer  # noqa: E402
from make_fixtures import tokenizer_json  # noqa: E402

SEED = 20261208

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)


def padded_tokenizer(vocab):
    """The fixtures' byte-level BPE, padded with unused tokens to `vocab` entries."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers, decoders
    _, byte_chars, merges = tokenizer_json()
    tokens = list(byte_chars) + ["Ġt", "he", "Ġthe"]
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens) - 1)] + ["<|endoftext|>"]
    tok = Tokenizer(tm.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok, tokens, merges


def main():
    out = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "target/scale", "llama-1b")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(**LLAMA_3_2_1B)
    model = transformers.LlamaForCausalLM(config).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"llama-1b: {n} parameters", flush=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    if os.path.exists(os.path.join(out, "generation_config.json")):
        os.remove(os.path.join(out, "generation_config.json"))
    tok, tokens, merges = padded_tokenizer(config.vocab_size)
    tok.save(os.path.join(out, "tokenizer.json"))
    with torch.no_grad():
        gguf_writer.write_all("llama3", model, config, out, tokens=tokens, merges=merges, types=("q8_0", "q4_0"))
    with open(os.path.join(out, "made_by.json"), "w") as f:
        json.dump({"script": "bench/scale/make_models.py", "seed": SEED, "parameters": n,
                   "torch": torch.__version__, "transformers": transformers.__version__}, f, indent=1)
    print("written", out, flush=True)


if __name__ == "__main__":
    main()
