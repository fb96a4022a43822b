# Run ONCE by hand with binllm at commit c455a52 (the flat layout, before binllm/engine/ etc.):
#   python tests/data/make_v1_dirs.py tests/data
# It wrote the v1_* directories (format_version 1, saved by that code) and the logits that code
# computed in memory; tests/test_saved_v1.py checks that today's code loads them identically.
import sys

import torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from binllm import QuantizeConfig, binarize_model, save_binarized
from safetensors.torch import save_file

out = Path(sys.argv[1])
for method in ["billm", "pbllm-10", "gptq", "arb-llm-rc"]:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 64, (1, 32), generator=g) for _ in range(8)]
    report = binarize_model(model, QuantizeConfig(method), calib)
    d = out / f"v1_{method}"
    save_binarized(model, report, None, d)
    ids = torch.arange(64).reshape(2, 32) % 64
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits}, str(out / f"v1_{method}_logits.safetensors"))
    print(method, d, logits.abs().mean().item())
