"""Metrics: FID/KID over pluggable features, CLIP score, ShapesEval and its analyzer."""
