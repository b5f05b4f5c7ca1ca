"""clips4: CLIP-S4 language-guided self-supervised semantic segmentation.

The code lives in the packages ``clips4.pipeline`` (``pipeline/``), ``clips4.trainer`` (``trainer/``),
``clips4.evaluate`` (``evaluate/``), ``clips4.cli`` (``cli/``), ``clips4.synthetic`` (``synthetic/``) and
``clips4.data`` (``data/``); this file only gives notebooks a short import::

    from clips4 import Segmenter
    pred = Segmenter("runs/train").predict("photo.jpg", ["sky", "tree"])   # pred.labels, pred.scores
"""

__all__ = ["Segmenter", "Prediction"]


def __getattr__(name: str):
    # lazy: `import clips4` must not import torch
    if name in __all__:
        from clips4.evaluate import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'clips4' has no attribute {name!r}")
