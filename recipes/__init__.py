"""Training recipes that use ``hf_ssam``: ViT on ImageNet, text classification, and the offline demo.

A package so that the recipes and their shared helpers import normally (``import recipes.vit_imagenet``); each
recipe also runs as a module or as a file from the repository root::

    python -m recipes.vit_imagenet --help
    python recipes/vit_imagenet.py --help
"""
