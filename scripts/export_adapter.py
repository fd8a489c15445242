"""Export a LoRA adapter (finetune/lora.py's adapter.safetensors) in peft's format, for transformers + peft and vLLM.

    python scripts/export_adapter.py --adapter out/lora/run/adapter_best.safetensors --out_dir out/lora/run/peft

Writes adapter_model.safetensors and adapter_config.json against the Hugging Face model the base checkpoint came
from (module names from scripts/hf_names.py). Our fused attn.qkv LoRA holds one (A, B) pair per q/k/v part (lora.py),
so each part becomes the q_proj, k_proj or v_proj adapter of the same rank r, exactly. r and lora_alpha are ours, so
peft's and vLLM's scaling lora_alpha / r is ours too. GPT-NeoX keeps Hugging Face's fused query_key_value: its adapter
holds the parts side by side (rank n_parts * r via rank_pattern, alpha_pattern keeping the scaling) with B's rows in
NeoX's per-head order. First-generation Qwen (remote code, two modules named c_proj) is not supported: merge instead.
"""

import json
import sys
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from cli import InputError
from hf_names import FAMILIES, hf_modules, lit_to_hf, pick_family
from lora import LoRAConfig, check_adapter_fits, part_slices, place_B, read_adapter, target_modules
from model import Config
from utils import adapter_base, load_config, output_folder, save_safetensors

# Where a module's name in transformers differs from its checkpoint tensor's: transformers >= 5 loads GPT-NeoX's
# embed_out.weight into a module named lm_head, and adapters must name the module.
MODULE_NAMES = {("gpt_neox", "embed_out"): "lm_head"}


def main(adapter: Path, out_dir: Optional[Path] = None, checkpoint_dir: Optional[str] = None,
         family: Optional[Literal[FAMILIES]] = None, base_model: Optional[str] = None) -> Path:
    """Export an adapter as a peft LoRA adapter folder.

    Args:
        adapter: adapter.safetensors written by finetune/lora.py (or its folder).
        out_dir: Folder to write adapter_model.safetensors and adapter_config.json into (created); default
            <adapter folder>/peft.
        checkpoint_dir: Base checkpoint; default the one the adapter was trained on (stored in the adapter).
        family: Hugging Face model_type of the base: llama, mistral, qwen2 or gpt_neox. Default: the model_type of
            checkpoint_dir/config.json when there is one, else guessed from the config.
        base_model: base_model_name_or_path to write (a hub id or a folder); default the base's hub id.
    """
    adapter = Path(adapter)
    settings, tensors = read_adapter(adapter)
    checkpoint_dir = adapter_base(adapter, settings, checkpoint_dir)
    config = load_config(checkpoint_dir)
    check_adapter_fits(settings, config, adapter)
    source_path = checkpoint_dir / "config.json"
    family = pick_family(config, json.loads(source_path.read_text()) if source_path.is_file() else {}, family)
    if family == "qwen":
        raise InputError(f"{checkpoint_dir}: first-generation Qwen adapters cannot be exported for peft/vLLM; merge "
                         "the adapter (scripts/merge_lora.py) and export the merged model (convert_lit_checkpoint.py)")
    lora = LoRAConfig(**settings["lora"])
    weights, ranks = peft_tensors(config, lora, tensors, family)

    out_dir = output_folder(out_dir or (adapter.parent if adapter.is_file() else adapter) / "peft", "--out_dir")
    save_safetensors(weights, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or config.hf_repo or str(checkpoint_dir),
        "r": lora.r, "lora_alpha": alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted({name.rsplit(".", 3)[-3] for name in weights}),
        "rank_pattern": ranks, "alpha_pattern": {k: alpha * (rank // lora.r) for k, rank in ranks.items()},
        # What vLLM accepts (vllm/lora/peft_helper.py): no bias, no modules_to_save, no DoRA, plain scaling.
        "bias": "none", "modules_to_save": None, "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    note = (f"; it was trained on a {settings['quantize']} base, which peft/vLLM load unquantized unless told"
            if settings.get("quantize") else "")
    print(f"{out_dir}: {len(weights) // 2} LoRA modules ({family}, r={lora.r}, alpha={alpha}, "
          f"targets {', '.join(adapter_config['target_modules'])}){note}", file=sys.stderr)
    return out_dir


def peft_tensors(config: Config, lora: LoRAConfig, tensors: Dict[str, torch.Tensor], family: str
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Our LoRA tensors under peft's names (base_model.model.<HF module>.lora_A/B.weight), and the rank of each module
    whose rank is not r (peft's rank_pattern)."""
    r = lora.r
    weights, ranks = {}, {}
    for module, parts in target_modules(config, lora).items():
        A, B = tensors[f"{module}.lora_A"].float(), tensors[f"{module}.lora_B"].float()
        hf = hf_modules(family, module)
        if parts is None:  # an adapter on the whole layer
            pieces = [(hf[0][0], A, B)]
        elif len(hf) == 3:  # separate q/k/v projections: part i of ours (A_i, B_i) is one of them, nothing shared
            by_part = {part: name for name, part in hf}
            names = [by_part[t] for t in "qkv" if t in lora.targets]  # the order qkv_parts gives the parts
            pieces = [(name, A[a], B[b]) for name, (_, a, b) in zip(names, part_slices(parts, r))]
        else:  # one fused projection: the parts side by side (rank n_parts * r), B zero off each part's own rows
            out_features = (config.n_head + 2 * config.n_query_groups) * config.head_size
            placed = place_B(B, parts, r, out_features)
            [(hf_weight, placed)] = lit_to_hf(family, config, f"{module}.weight", placed)  # NeoX: rows per head
            name = hf_weight.removesuffix(".weight")
            pieces = [(name, A, placed)]
            if len(parts) > 1:
                ranks[name.rsplit(".", 1)[-1]] = len(parts) * r
        for name, a, b in pieces:
            name = MODULE_NAMES.get((family, name), name)
            weights[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            weights[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    return weights, ranks


if __name__ == "__main__":
    from cli import run

    run(main)
