"""Datasets and transforms: images, shapes and their captions, control conditions; never imports models."""
