"""Evaluation: proposal recall and part mIoU, as per-image states with a pure merge."""
