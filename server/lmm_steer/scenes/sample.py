"""One scene on demand, as the web page's "new scene" button and the README's tour ask for it: the
PNG, its caption, its objects and its questions with their answers, exactly as ``scenes generate``
would write scene ``index`` of ``seed`` (same pixels, same questions in the same order)."""

from __future__ import annotations

import io
import random

from PIL import Image

from .generate import FORMAT_HINT, caption, make_scene, questions


def sample_scene(seed: int, index: int = 0, size: int = 128) -> dict:
    """Scene ``index`` of ``seed``: ``png`` (bytes), ``caption``, ``objects`` and ``questions``
    (each with ``prompt``: the question with the answer-format hint the scenes model was trained on)."""
    scene, pixels, _ = make_scene(seed, index, size)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    asked = questions(scene, random.Random(f"{seed}/{index}/questions"))  # generate()'s own stream
    return {
        "seed": seed, "index": index, "width": scene.width, "height": scene.height, "png": buf.getvalue(),
        "caption": caption(scene), "background": scene.background,
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "bbox": o.bbox, "occlusion": o.occlusion}
                    for o in scene.objects],
        "questions": [{"type": q["type"], "question": q["question"], "prompt": q["question"] + FORMAT_HINT,
                       "answer": q["answer"], "difficulty": q["difficulty"]} for q in asked],
    }
