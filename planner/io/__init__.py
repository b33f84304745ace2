"""The config files users already have: LLaMA-Factory training YAMLs, DeepSpeed JSONs, HF TrainingArguments.

Each module reads a file into the one TrainSetup (with warnings for what it does not model) and writes a setup back
in that tool's own keys, so that an import of an export gives the same setup.
"""
