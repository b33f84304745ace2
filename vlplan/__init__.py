"""vlplan: plan, prove and launch vision-language model fine-tunes."""

__version__ = "0.1.0"
