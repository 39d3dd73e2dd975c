"""Transfer learning on images: train a new head on a pretrained backbone, then fine-tune."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) would bury the job's own lines. Set
# here, before any of our modules imports TensorFlow; a value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
