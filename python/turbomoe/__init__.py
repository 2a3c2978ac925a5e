"""turbomoe: one import makes Hugging Face Transformers v5 MoE fine-tuning fast."""

__version__ = "0.1.0"
