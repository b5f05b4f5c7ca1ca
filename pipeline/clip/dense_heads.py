"""Dense heads: how the last block of a CLIP image tower turns patch tokens into pixel embeddings
(the variants and their references are described in :mod:`clips4.pipeline.clip`)."""
from __future__ import annotations

#: name -> one-line description; see :func:`vit_last_block` and :func:`resnet_dense`.
DENSE_VARIANTS: dict[str, str] = {
    "maskclip": "MaskCLIP: last block attention -> value path (v-proj, out-proj); residual + MLP kept (ViT, ResNet)",
    "sclip": "SCLIP: last block attention softmax(qq^T)+softmax(kk^T); residual + MLP kept (ViT only)",
    "clearclip": "ClearCLIP: last block attention softmax(qq^T); no residual, no MLP (ViT only)",
    "naclip": "NACLIP: last block attention softmax(kk^T + Gaussian neighbourhood); no residual, no MLP (ViT only)",
}


def resnet_dense(visual, x):
    """ModifiedResNet dense head (MaskCLIP): ``(B, 3, S, S)`` -> ``(B, S/32, S/32, D)``."""
    import torch.nn.functional as F

    v = visual
    x = v.stem(x)
    x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
    x = x.permute(0, 2, 3, 1)
    ap = v.attnpool
    # the attention pool's value and output projections as 1x1 convolutions (= per-position linear maps);
    # no positional embedding, no query/key (MaskCLIP)
    x = F.linear(x, ap.v_proj.weight, ap.v_proj.bias)
    return F.linear(x, ap.c_proj.weight, ap.c_proj.bias)


def vit_last_block(blk, x, grid, variant: str, neighbourhood):
    """The modified last ViT block for ``variant`` on batch-first tokens ``(B, L, C)``; ``neighbourhood(grid, dtype,
    device)`` gives NACLIP's additive bias."""
    import torch.nn.functional as F

    attn = blk.attn
    C = x.shape[-1]
    W, b = attn.in_proj_weight, attn.in_proj_bias
    y = blk.ln_1(x)
    if variant == "maskclip":
        # value path only: v = y Wv^T + bv, then out_proj; residual and MLP kept (MaskCLIP)
        val = F.linear(y, W[2 * C:], None if b is None else b[2 * C:])
        x = x + blk.ls_1(attn.out_proj(val))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    B, L, _ = x.shape
    H = attn.num_heads
    hd = C // H
    q, k, val = F.linear(y, W, b).chunk(3, dim=-1)
    q, k, val = (t.reshape(B, L, H, hd).transpose(1, 2) for t in (q, k, val))  # (B, H, L, hd)
    scale = hd ** -0.5
    if variant == "sclip":
        a = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
    elif variant == "clearclip":
        a = (q @ q.transpose(-1, -2) * scale).softmax(-1)
    elif variant == "naclip":
        logits = k @ k.transpose(-1, -2) * scale
        a = (logits + neighbourhood(grid, logits.dtype, logits.device)).softmax(-1)
    else:  # pragma: no cover - checked in __init__
        raise ValueError(variant)
    o = (a @ val).transpose(1, 2).reshape(B, L, C)
    o = attn.out_proj(o)
    if variant == "sclip":
        x = x + blk.ls_1(o)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return o  # clearclip / naclip: no residual, no MLP


def neighbourhood_bias(grid: tuple[int, int], std: float):
    """NACLIP's additive Gaussian bias ``exp(-|p - q|^2 / (2 std^2))`` between patch positions; zero for the
    class token's row and column. ``(1 + gh*gw, 1 + gh*gw)``."""
    import torch

    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    out = torch.zeros(gh * gw + 1, gh * gw + 1)
    out[1:, 1:] = torch.exp(-d2 / (2 * std ** 2))
    return out
