"""Lists the places where a patched prefill waits for the device (CUDA only), per method.

    python scripts/check_syncs.py --batch 8 --keep 64

Runs one prefill forward of a 7B-shaped LLaVA (one decoder layer) under
`torch.cuda.set_sync_debug_mode("warn")` and prints where each synchronising call came from. The
one wanted wait is the prompt's read (ids and mask in one copy) before the encoder is launched: the
host plans the pruned layout from it."""

from __future__ import annotations

import argparse
import warnings
from collections import Counter

import torch
from transformers import LlavaForConditionalGeneration

import vlmprune
from vlmprune.eval.tiny import llava_7b_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--methods", default=",".join(vlmprune.available_methods()))
    args = ap.parse_args()
    cfg = llava_7b_config()
    cfg.text_config.num_hidden_layers = 1
    dev = torch.device("cuda")
    with dev:
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ids = torch.cat([torch.full((args.batch, 3), 5), torch.full((args.batch, side * side), cfg.image_token_id),
                     torch.full((args.batch, 4), 7)], 1).to(dev)
    pv = torch.randn(args.batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=dev,
                     dtype=torch.bfloat16)
    with torch.no_grad():
        for method in args.methods.split(","):
            vlmprune.patch(model, method=method, keep=args.keep)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, logits_to_keep=1)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, logits_to_keep=1)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            vlmprune.unpatch(model)
            sites = Counter(f"{w.filename.split('/')[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
            print(f"## {method}: {sum(sites.values())} waits", flush=True)
            for site, n in sites.most_common():
                print(f"  {n} x {site}")


if __name__ == "__main__":
    main()
