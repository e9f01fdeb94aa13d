#!/usr/bin/env python3
"""Base-size random BLIP-2 checkpoints (Hugging Face layout) for speed comparisons; not fixtures.

    python3 scripts/bench/make_checkpoints.py [OUT_DIR]   # default target/bench-models

- base-itm:     Blip2ForImageTextRetrieval, vision 768 x 12 layers x 12 heads, MLP 3072, 224 px, patch 14;
                the full-size Q-Former (768 x 12 layers, 32 queries, cross-attention every 2nd layer), ITC 256.
- base-caption: Blip2ForConditionalGeneration with the same vision tower and Q-Former and an OPT-125m-shaped
                decoder (768 x 12 layers x 12 heads, FFN 3072, vocab 50272).
- vitg-itm (only with --vitg; ~1B parameters, 4 GB): base-itm with the real EVA ViT-g/14 vision shape
                (1408 x 39 layers x 16 heads, MLP 6144, 224 px), for GPU images/s against the card's peak.
Weights are random (seeded); speed does not depend on their values. Tokenizers come from the fixture
generator (tiny vocabularies are enough: the benchmarks run on random pixels and generate token ids).
"""
import sys
from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, BertTokenizer, GenerationConfig
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import generate  # noqa: E402  (fixture helpers: vocabularies, weight init)
import gen_caption  # noqa: E402

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               cross_attention_frequency=2, encoder_hidden_size=768, max_position_embeddings=512)
OPT125 = dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
              max_position_embeddings=2048, do_layer_norm_before=True, word_embed_proj_dim=768,
              vocab_size=50272, activation_function="relu", tie_word_embeddings=True,
              bos_token_id=2, eos_token_id=2, pad_token_id=1)


VITG = dict(VISION, hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16)


def retrieval(out: Path, vision=None):
    vocab = generate.bert_vocab()
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    vision = vision or VISION
    qformer = dict(QFORMER, vocab_size=30522, use_qformer_text_input=True, encoder_hidden_size=vision["hidden_size"])
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer,
                      num_query_tokens=32, image_text_hidden_size=256)
    torch.manual_seed(0)
    model = generate.randomize(Blip2ForImageTextRetrieval(cfg).eval(), 0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BlipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(out)


def caption(out: Path):
    # transformers' generate() without input_ids needs image_token_index (as the hub's blip2-opt-2.7b has).
    tok, vocab, merges = gen_caption.train_tokenizer(True)
    cfg = Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, vocab_size=30522), text_config=OPT125,
                      num_query_tokens=32, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(1)
    model = generate.randomize(Blip2ForConditionalGeneration(cfg).eval(), 1)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1)
    model.save_pretrained(out)
    tok.padding_side = "left"
    tok.save_pretrained(out)
    gen_caption.write_bpe_files(out, tok, vocab, merges)
    BlipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(out)


def main():
    args = [a for a in sys.argv[1:] if a != "--vitg"]
    base = Path(args[0]) if args else ROOT / "target" / "bench-models"
    todo = [("base-itm", retrieval), ("base-caption", caption)]
    if "--vitg" in sys.argv[1:]:
        todo.append(("vitg-itm", lambda out: retrieval(out, VITG)))
    for name, make in todo:
        out = base / name
        if (out / "config.json").is_file():
            print(f"{out}: exists")
            continue
        out.mkdir(parents=True, exist_ok=True)
        make(out)
        print(f"{out}: written")


if __name__ == "__main__":
    main()
