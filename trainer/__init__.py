"""Transfer learning on images: train a new head on a pretrained backbone, then fine-tune."""
