"""What an explanation names, as a mask on an image: from COCO-format annotations, or found by
Grounding DINO (boxes for the phrase) and segmented by SAM (a mask per box), for images nobody
annotated. Both through transformers; DINO and SAM load from a hub, so here only their plumbing
is tested, on tiny random configurations."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

DINO = "IDEA-Research/grounding-dino-tiny"
SAM = "facebook/sam-vit-base"


def phrase(explanation: str) -> str:
    """Grounding DINO's query form: lowercase, ending with a period."""
    text = " ".join(explanation.lower().split()).rstrip(".")
    return f"{text}."


class AnnotationGrounder:
    """Objects of a COCO file having every category or attribute word the explanation names."""

    def __init__(self, annotations) -> None:
        self.annotations = annotations

    def ground(self, explanation: str, file: str, shape: tuple[int, int]) -> np.ndarray:
        return self.annotations.grounded(self.annotations.named(explanation), file, shape)


class DinoSamGrounder:
    def __init__(self, dino: str = DINO, sam: str = SAM, box_threshold: float = 0.3, text_threshold: float = 0.25,
                 models=None) -> None:
        """``models``: (dino processor, dino model, sam processor, sam model) already built (tests)."""
        if models is None:
            from transformers import (
                AutoModelForZeroShotObjectDetection,
                AutoProcessor,
                SamModel,
                SamProcessor,
            )

            models = (AutoProcessor.from_pretrained(dino), AutoModelForZeroShotObjectDetection.from_pretrained(dino),
                      SamProcessor.from_pretrained(sam), SamModel.from_pretrained(sam))
        self.dino_processor, self.dino, self.sam_processor, self.sam = models
        self.dino.eval()
        self.sam.eval()
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

    @torch.inference_mode()
    def boxes(self, image: Image.Image, explanation: str) -> torch.Tensor:
        """``[n, 4]`` boxes (x0, y0, x1, y1 in pixels) where DINO finds the explanation's phrase."""
        inputs = self.dino_processor(images=image, text=phrase(explanation), return_tensors="pt")
        out = self.dino(**inputs)
        found = self.dino_processor.post_process_grounded_object_detection(
            out, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        return found["boxes"]

    @torch.inference_mode()
    def ground(self, explanation: str, file: str, shape: tuple[int, int]) -> np.ndarray:
        with Image.open(file) as im:
            image = im.convert("RGB")
        boxes = self.boxes(image, explanation)
        if len(boxes) == 0:
            return np.zeros(shape, bool)
        inputs = self.sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        out = self.sam(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
        masks = self.sam_processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                                      inputs["reshaped_input_sizes"])[0]  # [boxes, 1, H, W]
        return masks.any(0)[0].numpy().astype(bool)
