"""Whole-model verbs: prune, add / merge SparseLoRA, compress, save / load model folders, inspect (layer 5 of
docs/ARCHITECTURE.md, which also gives the data path between them)."""
