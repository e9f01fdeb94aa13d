"""transformers' own half-precision error on the caption fixtures: the reference for the tolerances of
crates/blipdex-model/tests/caption.rs::half_precision_agrees_with_f32 (not run in CI; prints, writes nothing).

    python scripts/bench/half_reference.py     # with tests/fixtures/requirements.txt installed

For each fixture it runs Blip2ForConditionalGeneration in f32, bf16 and f16 on the CPU on the golden logits case (two
images, left-padded prompts) and prints the masked max |logits - golden f32 logits| next to the largest |logit|.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
import gen_caption  # noqa: E402  (the generator's own input assembly)


@torch.no_grad()
def main():
    for name in ["caption-a", "caption-b"]:
        g = load_file(FIXTURES / "golden" / f"{name}.safetensors")
        ref, mask = g["logits"], g["logits_attention_mask"].unsqueeze(-1)
        tok = AutoTokenizer.from_pretrained(FIXTURES / "models" / name)
        top = (ref.abs() * mask).max().item()
        for dtype in [torch.float32, torch.bfloat16, torch.float16]:
            model = Blip2ForConditionalGeneration.from_pretrained(FIXTURES / "models" / name, dtype=dtype).eval()
            index = getattr(model.config, "image_token_index", None)
            _, embeds, att, _ = gen_caption.lm_inputs(
                model, tok, g["pixel_values"][:2].to(dtype), [gen_caption.PROMPT, "a photo of"], index)
            logits = model.language_model(inputs_embeds=embeds, attention_mask=att).logits.float()
            d = ((logits - ref).abs() * mask).max().item()
            print(f"{name} {str(dtype):15} max |Δ logit| {d:.4f} of max |logit| {top:.2f} ({100 * d / top:.2f}%)")


if __name__ == "__main__":
    main()
