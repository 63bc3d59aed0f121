"""Evaluation: VQA accuracy of VLMs (:mod:`vlmsparse.eval.vqa`) and language-model perplexity
(:mod:`vlmsparse.eval.perplexity`). See docs/ARCHITECTURE.md for where it sits in the package."""
