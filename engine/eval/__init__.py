"""Evaluation metrics: FID (fid.py), CLIP score (clip_score.py), GenEval-style synthetic score (geneval.py)."""
