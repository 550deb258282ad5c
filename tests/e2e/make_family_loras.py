"""LoRA files for the other-family checkpoints of make_checkpoints.py, written by third-party code: kohya sd-scripts'
``networks/lora.py`` (a LoCon: attention, MLP and 3x3 convolutions) and lycoris-lora's kohya wrapper (LoHa).

The checkpoint is loaded the way sd-scripts loads it for training (``model_util.load_models_from_stable_diffusion_
checkpoint``: diffusers-layout U-Net, HF CLIP text encoder; for SD2 the OpenCLIP weights converted), the network is
built by the writer on those modules, every factor is filled with random values and the first factor of each module
is rescaled so that ||dW|| = REL * ||W|| (as ../shared/testbed/tools/make_lycoris.py does: freshly initialised
files have a zero factor and would change nothing), then the writer's own ``save_weights`` writes the file.

Run it with the test bed's kohya venv (sd-scripts + lycoris-lora 4.1.3):

    PYTHONPATH=$TESTBED/src/sd-scripts:$TESTBED/src/sd-scripts/networks $TESTBED/venv-kohya/bin/python \\
        tests/e2e/make_family_loras.py lora|loha sd2|sd1 CKPT OUT.safetensors [dim] [rel]

Used for the e2e suite: ``test_lora_sd2`` (lora, sd2-random, dim 4, rel 0.3) and ``test_loha_sd2`` (loha, sd2-random,
dim 4, rel 0.3): 138 TE + 278 U-Net and 138 TE + 194 U-Net modules. 17 s and 8 GB peak RAM each on the 2-core
test bed (most of it loading and converting the checkpoint).
"""
from __future__ import annotations

import json
import sys
import time

import torch


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] not in ("lora", "loha") or argv[1] not in ("sd1", "sd2"):
        print("usage: make_family_loras.py lora|loha sd1|sd2 CKPT OUT.safetensors [dim] [rel]", file=sys.stderr)
        return 2
    algo, family, ckpt, out = argv[:4]
    dim = int(argv[4]) if len(argv) > 4 else 4
    rel = float(argv[5]) if len(argv) > 5 else 0.3
    v2 = family == "sd2"
    from library import model_util, sai_model_spec

    torch.manual_seed(17 if algo == "lora" else 19)
    te, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, ckpt)
    if algo == "lora":
        import lora

        kw = {"conv_dim": str(dim), "conv_alpha": str(dim)}
        net = lora.create_network(1.0, dim, dim, vae, te, unet, **kw)
        module_name = "networks.lora"
    else:
        import lycoris.kohya

        kw = {"algo": "loha", "conv_dim": dim, "conv_alpha": dim, "preset": "attn-mlp"}
        net = lycoris.kohya.create_network(1.0, dim, dim, vae, te, unet, **kw)
        module_name = "lycoris.kohya"
    modules = list(net.text_encoder_loras) + list(net.unet_loras)
    # sd-scripts' LoRAModule drops its org_module in apply_to: take the weights first
    base = {id(m): (m.org_module.weight if algo == "lora" else m.org_module[0].weight).detach() for m in modules}
    net.apply_to(te, unet, True, True)  # registers the modules (lycoris writes an empty file without it)
    with torch.no_grad():
        for m in modules:
            for _, p in m.named_parameters():
                p.normal_(0, 1)
            w = base[id(m)]
            if algo == "lora":
                # up (out, r[, 1, 1]) times down (r, in[, k, k]): the delta's norm, whatever its final shape
                d = m.lora_up.weight.float().flatten(1) @ m.lora_down.weight.float().flatten(1)
                d = d * m.scale
                m.lora_up.weight.mul_(float(rel * w.float().norm() / d.norm()))
            else:
                d, _ = m.get_diff_weight(1, shape=w.shape)
                m.hada_w1_a.mul_(float(rel * w.float().norm() / d.float().norm()))
    md = {"ss_v2": str(v2), "ss_base_model_version": model_util.get_model_version_str_for_sd1_sd2(v2, False),
          "ss_network_module": module_name, "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
          "ss_network_args": json.dumps({k: str(v) for k, v in kw.items()}),
          "lora-core-e2e": f"random {algo} (rel {rel}) for {family}, written by {module_name}"}
    title = out.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    md.update(sai_model_spec.build_metadata(None, v2, False, False, True, False, time.time(), title=title))
    net.save_weights(out, torch.float16, md)
    print(f"{algo} ({module_name}): {len(net.text_encoder_loras)} TE + {len(net.unet_loras)} UNet modules -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
